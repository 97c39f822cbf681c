"""Benchmark of `sample_tokens`: the fused CUDA kernel (csrc/) vs the PyTorch reference (sort-based top-p).

Time per call (median, p20, p80; warm-up excluded, L2 flushed between calls by triton's do_bench) and
GB/s of logits read once (B * V * itemsize / time), for B in {1, 64, 256, 1024}, V = 128256, bf16 and
fp32 logits and three truncation settings. The issue's targets: >= 80% of HBM bandwidth for B >= 64
and >= 5x the reference. On a CPU-only machine it runs a smoke mode: the reference alone, small B.

    python bench/bench_sampling.py [--quick] [--out-dir bench/results]

Writes one JSONL row per measurement (hardware, versions, git sha, command) to
<out-dir>/sampling.jsonl (appended) and a markdown table to <out-dir>/sampling.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from kernels import _csrc
from kernels.sampling import sample_tokens_reference

V = 128256
# (temperature, top_p, top_k): plain softmax sampling, nucleus, top-k + nucleus.
SETTINGS = [(1.0, 1.0, 0), (1.0, 0.95, 0), (0.7, 0.9, 50)]


def _git_sha() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def _environment() -> dict:
    env = {
        "hardware": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _time_ms(fn, cuda: bool, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds per call."""
    if cuda:
        from triton.testing import do_bench

        return tuple(
            do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 200, quantiles=[0.5, 0.2, 0.8])
        )
    fn()  # warm-up
    times = []
    for _ in range(2 if quick else 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return q(0.5), q(0.2), q(0.8)


def run(out_dir: Path, quick: bool) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    have_op = cuda and _csrc.load()
    batches = ([1, 64] if quick else [1, 64, 256, 1024]) if cuda else ([1] if quick else [1, 4, 16])
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    env = _environment()
    rows = []
    for dtype in dtypes:
        for B in batches:
            logits = torch.randn(B, V, device=device, dtype=torch.float32).mul_(3).to(dtype)  # (B, V)
            gbytes = logits.numel() * logits.element_size() / 1e9
            for T, top_p, top_k in SETTINGS if not quick else SETTINGS[1:2]:
                impls = {
                    "torch": functools.partial(
                        sample_tokens_reference, logits, temperature=T, top_p=top_p, top_k=top_k
                    )
                }
                if have_op:
                    impls["cuda"] = functools.partial(
                        torch.ops.singleturn_rl.sample_tokens, logits, T, top_p, top_k, 0, 0
                    )
                times = {name: _time_ms(fn, cuda, quick) for name, fn in impls.items()}
                for name, (p50, p20, p80) in times.items():
                    row = {
                        "op": "sample_tokens", "impl": name, "B": B, "V": V, "dtype": str(dtype).split(".")[-1],
                        "temperature": T, "top_p": top_p, "top_k": top_k,
                        "ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "gbps": gbytes / (p50 / 1e3),
                        "speedup_vs_torch": times["torch"][0] / p50, **env,
                    }  # fmt: skip
                    rows.append(row)
                    print(
                        f"{name:5s} {row['dtype']:8s} B={B:5d} T={T} top_p={top_p} top_k={top_k:3d}: "
                        f"{p50:9.3f} ms [{p20:.3f}, {p80:.3f}]  {row['gbps']:8.2f} GB/s  x{row['speedup_vs_torch']:.1f}"
                    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sampling.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out_dir / "sampling.md").write_text(_markdown(rows, env, have_op, cuda))
    return rows


def _markdown(rows: list[dict], env: dict, have_op: bool, cuda: bool) -> str:
    lines = [
        "# sample_tokens: fused CUDA kernel vs PyTorch reference",
        "",
        f"{env['hardware']}, torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
        f"git {env['git_sha'][:10]}, {env['time']}",
        f"Command: `{env['command']}`",
        "",
    ]
    if not have_op:
        lines += [
            "CUDA op not measured here ("
            + ("build failed" if cuda else "no GPU: reference smoke run")
            + ").",
            "",
        ]
    lines += [
        "| impl | dtype | B | T | top_p | top_k | ms (p50) | p20-p80 | GB/s | x vs torch |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['dtype']} | {r['B']} | {r['temperature']} | {r['top_p']} | {r['top_k']} | "
            f"{r['ms_p50']:.3f} | {r['ms_p20']:.3f}-{r['ms_p80']:.3f} | {r['gbps']:.2f} | {r['speedup_vs_torch']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="few shapes and repetitions (smoke test)")
    args = parser.parse_args(argv)
    run(args.out_dir, args.quick)


if __name__ == "__main__":
    main()
