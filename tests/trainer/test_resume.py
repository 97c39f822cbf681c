"""Exact resume: a run stopped mid-way (after a checkpoint, as if killed) and resumed with --resume
reproduces the uninterrupted run's per-step losses bit for bit on CPU, through SFT and GRPO.

Runs `torchrun trainer/main.py` on a tiny synthetic states file (no ALFWorld), a tokenizer trained on
it and a ~20k-parameter model; evaluation is off. Three launches: uninterrupted, stopped at step 4
(inside GRPO: 5 SFT steps + 1 GRPO step), resumed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from singleturn.trainer.synthetic import write_synthetic_inputs

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"

SFT_STEPS, GRPO_STEPS = 5, 3
STOP = SFT_STEPS + 1  # inside GRPO


def tiny_args(root: Path, states: Path, tok: Path, name: str) -> list[str]:
    return [
        f"--run.name={name}",
        f"--run.out_dir={root / 'runs'}",
        "--run.num_threads=1",
        "--run.plots=false",
        f"--data.states_path={states}",
        f"--data.tokenizer_path={tok}",
        f"--data.games_dir={root / 'games'}",
        "--data.history_window=1",
        "--data.max_seq_len=512",
        "--model.dim=32",
        "--model.n_layers=1",
        "--model.n_heads=2",
        "--model.n_kv_heads=1",
        "--model.ffn_dim=64",
        "--model.max_seq_len=512",
        "--eval.enabled=false",
        "--checkpoint.export_final=false",
        "--checkpoint.keep_last=2",
        f"--sft.steps={SFT_STEPS}",
        "--sft.batch_size=8",
        "--sft.micro_batch_size=4",
        f"--grpo.steps={GRPO_STEPS}",
        "--grpo.batch_size=2",
        "--grpo.micro_batch_size=6",
        "--grpo.ppo_epochs=2",
        "--rollout.group_size=8",
        "--rollout.max_new_tokens=8",
        "--sft.lr=3e-2",
        "--optim.lr=3e-3",
    ]


def run_torchrun(args: list[str], nproc: int = 1, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(REPO / "trainer/main.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def step_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] in ("sft", "grpo")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    states, tok = write_synthetic_inputs(root)
    run_torchrun(tiny_args(root, states, tok, "full"))
    stopped = run_torchrun(tiny_args(root, states, tok, "killed") + [f"--run.stop_after_step={STOP}"])
    resumed = run_torchrun(tiny_args(root, states, tok, "killed") + ["--resume"])
    return root / "runs", stopped, resumed


def test_stopped_run_left_a_checkpoint_and_no_later_steps(runs):
    out, stopped, _ = runs
    assert f"stop_after_step={STOP}" in stopped.stdout
    assert (out / "full" / "checkpoints" / f"step_{SFT_STEPS + GRPO_STEPS}").is_dir()
    assert f"continuing after step {STOP}" in runs[2].stdout


def test_resumed_losses_equal_uninterrupted_bit_for_bit(runs):
    out, _, _ = runs
    full, resumed = step_rows(out / "full"), step_rows(out / "killed")
    assert sorted(full) == sorted(resumed) == list(range(1, SFT_STEPS + GRPO_STEPS + 1))
    for step in sorted(full):
        a, b = full[step], resumed[step]
        assert a["kind"] == b["kind"]
        for key in ("loss", "grad_norm", "reward_mean", "clip_frac", "ratio", "kl", "response_len"):
            if key in a:
                assert a[key] == b[key], f"step {step} {key}: uninterrupted {a[key]!r} vs resumed {b[key]!r}"
    # GRPO steps really trained: some groups had reward variance, so a policy loss was optimized.
    assert any(
        full[s]["kind"] == "grpo" and full[s]["kept_sequences"] > 0 and not full[s]["skipped"] for s in full
    )


def test_resumed_timings_continue_the_checkpoints(runs):
    """The resumed session never entered SFT (stopped inside GRPO), yet its timings.json counts the SFT
    seconds the first session spent (carried in the checkpoint), and its total covers both sessions."""
    out, _, _ = runs
    t = json.loads((out / "killed" / "timings.json").read_text())
    assert t["train/sft"] > 0 and t["train/grpo"] > 0, t
    assert t["total"] >= t["train/sft"] + t["train/grpo"] + t["checkpoint"], t


def test_resume_with_a_different_config_is_refused(runs, tmp_path):
    out, _, _ = runs
    root = out.parent
    args = tiny_args(root, root / "states.jsonl", root / "tokenizer.json", "killed") + [
        "--resume",
        "--optim.lr=1e-2",
    ]
    saved = (out / "killed" / "config.json").read_text()
    proc = _launch(args)
    assert proc.returncode != 0, proc.stderr[-2000:]  # torchrun exits 1 when a worker exits 2
    assert "optim.lr" in proc.stderr and "0.003" in proc.stderr, "the differing key with both values"
    assert (out / "killed" / "config.json").read_text() == saved, "a refused resume writes nothing"


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=1", str(REPO / "trainer/main.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_rerun_without_resume_keeps_the_checkpoints(runs):
    out, _, _ = runs
    root = out.parent
    before = sorted(p.name for p in (out / "full" / "checkpoints").iterdir())
    proc = _launch(tiny_args(root, root / "states.jsonl", root / "tokenizer.json", "full"))
    assert proc.returncode != 0 and "--resume" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "full" / "checkpoints").iterdir()) == before


def test_huge_lr_stops_the_run_and_never_saves_nonfinite_weights(runs):
    """lr 1e30: the first update leaves huge (finite) weights, every later loss is non-finite and is
    skipped; run.max_nonfinite_steps=3 consecutive ones stop the run with exit 4, and no checkpoint
    or export holds a non-finite value."""
    from safetensors.torch import load_file

    out, _, _ = runs
    root = out.parent
    args = tiny_args(root, root / "states.jsonl", root / "tokenizer.json", "huge-lr") + [
        "--optim.lr=1e30",
        "--sft.lr=0",
        "--checkpoint.every=1",
    ]
    proc = _launch(args)
    assert proc.returncode != 0 and "exitcode  : 4" in proc.stderr, proc.stderr[-2000:]
    assert "step 4 (sft): 3 consecutive non-finite updates (last: nonfinite_" in proc.stderr
    rows = [json.loads(x) for x in (out / "huge-lr" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r.get("skip_reason")]  # the third one stopped the run before its row
    assert [r["step"] for r in skipped] == [2, 3] and skipped[-1]["nonfinite_total"] == 2
    assert all(r["skip_reason"] in ("nonfinite_loss", "nonfinite_grad_norm") for r in skipped)
    for shard in (out / "huge-lr" / "checkpoints").glob("step_*/shard_rank*.safetensors"):
        for name, t in load_file(shard).items():
            assert torch.isfinite(t).all(), f"{shard}: {name}"


def test_moments_from_seed_the_first_stage_and_refuse_other_weights(runs):
    """optim.moments_from through trainer/main.py: an RL run continuing an SFT run's final/ starts
    from that run's AdamW moments (exactness: tests/trainer/test_checkpoint.py); from other weights
    (here a fresh init instead of model.path) it stops before any step, naming the mismatch."""
    out, _, _ = runs
    root = out.parent
    states, tok = root / "states.jsonl", root / "tokenizer.json"
    src = out / "sft-src"
    run_torchrun(
        tiny_args(root, states, tok, "sft-src")
        + ["--run.stages=sft", "--sft.steps=2", "--checkpoint.export_final=true"]
    )
    rl = ["--run.stages=grpo", "--grpo.steps=1", f"--optim.moments_from={src}"]
    proc = run_torchrun(tiny_args(root, states, tok, "rl-warm") + rl + [f"--model.path={src / 'final'}"])
    assert (
        f"[optim] grpo: AdamW moments and step count 2 from {src / 'checkpoints' / 'step_2'}" in proc.stdout
    )
    assert step_rows(out / "rl-warm")[1]["kind"] == "grpo"
    bad = _launch(tiny_args(root, states, tok, "rl-other") + rl)
    assert bad.returncode != 0 and "parameter elements of the model differ" in bad.stderr, bad.stderr[-2000:]
    assert not (out / "rl-other" / "metrics.jsonl").exists() or not step_rows(out / "rl-other")
