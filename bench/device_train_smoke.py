"""The trainer end to end on whatever device there is: `torchrun trainer/main.py`, hand FSDP, SFT + GRPO.

    python bench/device_train_smoke.py --work DIR [--nproc 1]

Writes a synthetic states file and tokenizer (singleturn.trainer.synthetic: no ALFWorld), then runs
the real launcher with SFT and single-turn GRPO steps on a small model: on CUDA with NCCL, bf16
all-gathers and bf16 autocast (fp32 master weights, reduce-scatter and AdamW), on CPU with gloo and
fp32. Checks that every step was logged with a finite loss and gradient norm, that the GRPO steps
sampled and scored responses, and that a checkpoint was written; writes DIR/train_smoke.jsonl + .md.
Exit status 0 when all checks pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SFT_STEPS, GRPO_STEPS = 3, 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--nproc", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    from singleturn.trainer.synthetic import write_synthetic_inputs

    cuda = torch.cuda.is_available()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "inputs").mkdir(exist_ok=True)
    states, tok = write_synthetic_inputs(work / "inputs", n=64)  # not beside the result rows
    dtype = "bfloat16" if cuda else "float32"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        str(REPO / "trainer" / "main.py"),
        "--run.name=smoke",
        f"--run.out_dir={work / 'runs'}",
        "--run.plots=false",
        "--run.num_threads=1",
        f"--data.states_path={states}",
        f"--data.tokenizer_path={tok}",
        f"--data.games_dir={work / 'games'}",
        "--data.history_window=1",
        "--data.max_seq_len=512",
        "--model.dim=256",
        "--model.n_layers=4",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        "--model.ffn_dim=512",
        "--model.max_seq_len=512",
        "--eval.enabled=false",
        "--checkpoint.export_final=true",
        "--checkpoint.keep_last=1",
        "--run.stages=sft,grpo",
        f"--sft.steps={SFT_STEPS}",
        "--sft.batch_size=16",
        "--sft.micro_batch_size=8",
        "--sft.lr=3e-3",
        f"--grpo.steps={GRPO_STEPS}",
        "--grpo.batch_size=4",
        "--grpo.micro_batch_size=16",
        "--rollout.group_size=8",
        "--rollout.max_new_tokens=8",
        "--optim.lr=1e-3",
        f"--fsdp.param_dtype={dtype}",
        f"--fsdp.autocast={'bfloat16' if cuda else 'none'}",
        f"--rollout.dtype={dtype}",
    ]
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    print(proc.stdout[-6000:])
    print(proc.stderr[-6000:], file=sys.stderr)
    failures = [] if proc.returncode == 0 else [f"torchrun exited {proc.returncode}"]
    run = work / "runs" / "smoke"
    metrics = run / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in rows if r.get("kind") in ("sft", "grpo")]
    kinds = [r["kind"] for r in steps]
    if kinds != ["sft"] * SFT_STEPS + ["grpo"] * GRPO_STEPS:
        failures.append(f"logged steps {kinds}, expected {SFT_STEPS} sft then {GRPO_STEPS} grpo")
    for r in steps:
        for key in ("loss", "grad_norm"):
            if key in r and not math.isfinite(r[key]):
                failures.append(f"step {r['step']} {key} = {r[key]}")
        if r["kind"] == "grpo" and "reward_mean" not in r:
            failures.append(f"grpo step {r['step']} has no reward_mean: {sorted(r)}")
    if not list((run / "checkpoints").glob("step_*")):
        failures.append("no checkpoint written")
    if not (run / "final" / "model.safetensors").exists():
        failures.append("no final/model.safetensors exported")
    row = {
        "topic": "train_smoke",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "nproc": args.nproc,
        "dtype": dtype,
        "backend": "nccl" if cuda else "gloo",
        "wall_s": wall,
        "steps": len(steps),
        "sft_loss_first": steps[0]["loss"] if steps else None,
        "sft_loss_last": steps[SFT_STEPS - 1]["loss"] if len(steps) >= SFT_STEPS else None,
        "grpo_reward_mean": [r.get("reward_mean") for r in steps if r["kind"] == "grpo"],
        "ok": not failures,
        "failures": failures,
        "torch": torch.__version__,
    }
    (work / "train_smoke.jsonl").write_text(json.dumps(row) + "\n")
    md = [
        "# Trainer smoke run (torchrun trainer/main.py, hand FSDP, SFT + GRPO)",
        "",
        "| step | kind | loss | grad norm | reward mean | update | rollout s | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in steps:
        md.append(
            f"| {r['step']} | {r['kind']} | {r.get('loss', float('nan')):.4f} | {r.get('grad_norm', float('nan')):.3f} "
            f"| {r.get('reward_mean', '')} | {r.get('skip_reason', 'applied')} | {r.get('time_rollout', 0):.3f} "
            f"| {r.get('time_train', 0):.3f} |"
        )
    md += [
        "",
        f"{row['backend']}, {dtype}, {args.nproc} rank(s), {wall:.1f} s wall (launch included); "
        + ("all checks passed" if not failures else "FAILED: " + "; ".join(failures)),
    ]
    (work / "train_smoke.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
