"""torch.profiler trace of a few training steps: a chrome trace and a top-kernels table in a run directory.

Runs the same GRPO or SFT step as bench/bench_train_step.py (same flags, same synthetic states) under
`torch.profiler.profile` with a wait/warmup/active schedule, then writes to --run-dir:

    trace_rank{R}.json        chrome trace (open in https://ui.perfetto.dev or chrome://tracing);
                              the phases appear as `phase/rollout`, `phase/fwd_bwd`, `phase/optimizer`
    top_kernels_rank{R}.md    the kernels (CUDA) or ops (CPU) with the most self time in the active steps
    top_kernels_rank{R}.jsonl the same rows as JSON

    python bench/profile_steps.py --algo grpo --preset llama3.2-1b --run-dir runs/profile_1b
    torchrun --nproc_per_node=2 bench/profile_steps.py --algo sft --preset llama3.2-3b --run-dir runs/prof
    python bench/profile_steps.py --device cpu --quick --run-dir /tmp/prof   # tiny preset on CPU

Why not bench/profile.py: a script's folder is sys.path[0], so a bench/profile.py would shadow the
standard-library `profile` module for every script in bench/; `cProfile` imports `profile`, and
`torch._dynamo` (torch.compile) imports `cProfile`, so those imports would break.

Reference: PyTorch profiler recipe (schedule, export_chrome_trace, key_averages); torchtitan
`profiling.py` (per-rank traces under the run directory).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bench_train_step as bts
import torch
from torch.profiler import ProfilerActivity, profile, schedule

from singleturn.trainer.dist import destroy, init_distributed


def _top_rows(prof, on_cuda: bool, limit: int) -> list[dict]:
    """Ops/kernels ranked by self time (device time on CUDA, CPU time otherwise)."""
    attr = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    # The phase/ and ProfilerStep# ranges are annotations (their self time is Python overhead), not ops.
    events = [
        e
        for e in prof.key_averages()
        if getattr(e, attr) > 0 and not e.key.startswith(("phase/", "ProfilerStep#"))
    ]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {
            "name": e.key,
            "calls": e.count,
            "self_ms": getattr(e, attr) / 1e3,
            "percent": 100.0 * getattr(e, attr) / total,
            "avg_us": getattr(e, attr) / max(e.count, 1),
        }
        for e in events[:limit]
    ]


def _markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| # | kernel / op | calls | self ms | % | avg us |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        name = r["name"].replace("|", "\\|")
        name = name if len(name) <= 90 else name[:87] + "..."
        lines.append(
            f"| {i} | `{name}` | {r['calls']} | {r['self_ms']:.2f} | {r['percent']:.1f} | {r['avg_us']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("--run-dir", default="runs/profile")
    p.add_argument("--top", type=int, default=30, help="rows in the top-kernels table")
    p.add_argument("--record-shapes", action="store_true")
    p.add_argument("--with-stack", action="store_true")
    own, rest = p.parse_known_args(argv)
    args = bts.parse_args(rest)  # the bench_train_step flags (--preset, --algo, --prompt-len, ...)
    algo, prompt_len, response_len = args.algo[0], args.prompt_len[0], args.response_len[0]
    info = init_distributed()
    device = torch.device("cpu") if args.device == "cpu" else info.device
    run_dir = Path(own.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    r = info.rank
    title = (
        f"Top {'CUDA kernels' if on_cuda else 'CPU ops'} by self time: {algo} {args.preset} "
        f"P={prompt_len} R={response_len}, {args.steps} active steps, rank {r} of {info.world_size}"
    )
    trace = run_dir / f"trace_rank{r}.json"

    def write_outputs(prof) -> None:  # on_trace_ready: called once, when the active steps end
        prof.export_chrome_trace(str(trace))
        rows = _top_rows(prof, on_cuda, own.top)
        md = _markdown(rows, title)
        (run_dir / f"top_kernels_rank{r}.md").write_text(md)
        with open(run_dir / f"top_kernels_rank{r}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        if r == 0:
            print(md, flush=True)
            print(f"[profile] chrome trace: {trace}", flush=True)

    try:
        s = bts.build_setup(args, device, info.rank, info.world_size, prompt_len, response_len)
        step_fn = bts.STEPS[algo]
        with profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1),
            on_trace_ready=write_outputs,
            record_shapes=own.record_shapes,
            with_stack=own.with_stack,
        ) as prof:
            for i in range(args.warmup + args.steps):
                step_fn(s, bts.PhaseTimer(device), i)
                prof.step()
    finally:
        destroy()


if __name__ == "__main__":
    main()
