"""Shared benchmark helpers: timing with quantiles, peak memory, environment rows, JSONL + markdown.

Every bench/bench_<topic>.py script imports this (bench/ is sys.path[0] when a script runs) and
accepts the common flags from `base_parser`: `--out-dir` (default bench/results), `--quick` (few
shapes, short timings: what bench/device_run.sh runs) and `--cpu-smoke` (tiny CPU shapes, seconds).
Rows are dicts; `env_info()` is merged into each so a JSONL line says where and what it measured.

Timing follows triton.testing.do_bench: warm-up excluded, the L2 cache flushed before every rep on
CUDA, median with p20/p80 over the reps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def base_parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every benchmark accepts (device_run.sh relies on them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where <topic>.jsonl / <topic>.md go")
    p.add_argument("--quick", action="store_true", help="few shapes, short timings (device_run.sh)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, torch providers only")
    return p


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return (
            out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
            if out.returncode == 0
            else "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info() -> dict:
    """Hardware, versions and git sha: the columns that make a row comparable later."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "num_gpus": torch.cuda.device_count() if cuda else 0,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "host": platform.node(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _quantiles(ms: Sequence[float]) -> dict:
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return {"ms_median": statistics.median(ms), "ms_p20": q[1], "ms_p80": q[7], "reps": len(ms)}


def time_ms(
    fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0, max_reps: int = 1000
) -> dict:
    """Run fn repeatedly: {"ms_median", "ms_p20", "ms_p80", "reps"}; warm-up not counted.

    CUDA: CUDA events per rep, L2 flushed (a 256 MB write) before each rep, as do_bench does.
    CPU: wall clock (perf_counter). The number of reps is sized from a first timed call.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(int(warmup_ms / est)):
        fn()
    reps = max(3, min(max_reps, int(rep_ms / est)))
    ms = []
    if cuda:
        flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            flush.zero_()
            s.record()
            fn()
            e.record()
        sync()
        ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(ms)


def time_interleaved(fns: dict[str, Callable[[], object]], *, reps: int, warmup: int = 0) -> dict[str, dict]:
    """Time several variants of one job in one process: {name: {"ms_median", "ms_p20", "ms_p80", "reps"}}.

    Every rep runs each variant once, in an order reversed every other rep, so a change of load on
    shared cores (or a clock change) hits all variants alike and their ratio stays meaningful even
    when the absolute times are noisy. Wall clock per call; on CUDA a synchronize before and after.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    ms: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else reversed(names):
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            ms[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _quantiles(v) for name, v in ms.items()}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes allocated by fn() above what was allocated before it (outputs it keeps included).

    CUDA: the caching allocator's peak counter. CPU: the profiler's alloc/free events, summed in
    time order (torch has no CPU peak counter).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # + on allocation, - on free
        peak = max(peak, live)
    return peak


def write_jsonl(out_dir: Path | str, topic: str, rows: Sequence[dict]) -> Path:
    """Append rows to <out_dir>/<topic>.jsonl (one JSON object per line)."""
    path = Path(out_dir) / f"{topic}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub markdown table; columns are (row key, header) pairs; missing keys print empty."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(
    out_dir: Path | str, topic: str, title: str, rows: Sequence[dict], columns: Sequence[tuple[str, str]]
) -> Path:
    """Write <out_dir>/<topic>.md: a title, the environment of the first row, the table."""
    path = Path(out_dir) / f"{topic}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    env = rows[0] if rows else env_info()
    header = ", ".join(
        f"{k} {env.get(k)}" for k in ("device", "torch", "triton", "cuda", "git_sha", "timestamp")
    )
    path.write_text(f"# {title}\n\n{header}\n\n{markdown_table(rows, columns)}\n")
    return path
