"""End to end through torchrun on CPU with 2 ranks: a few SFT and GRPO steps on a tiny synthetic
states file (no ALFWorld), then the run directory is checked: config.json, metrics.jsonl, checkpoints,
final/ (HF safetensors + tokenizer.json loadable by model.load_hf_checkpoint), plots.

The same SFT steps on 1 rank give the same losses (the world size only splits the global batch;
the loss is normalized by the global token count and gradients are summed), torchtitan-style.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.dont_write_bytecode = True
REPO = Path(__file__).resolve().parents[2]


def _load_resume_helpers():
    # The resume test holds the synthetic fixture; load it by path (tests/ is not a package).
    import importlib.util

    spec = importlib.util.spec_from_file_location("_resume_helpers", REPO / "tests/trainer/test_resume.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


H = _load_resume_helpers()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("integration")
    states, tok = H.write_synthetic_inputs(root)
    common = H.tiny_args(root, states, tok, "two") + [
        "--checkpoint.export_final=true",
        "--run.plots=true",
        "--grpo.ppo_epochs=1",
    ]
    two = H.run_torchrun(common, nproc=2)
    one_args = [a if not a.startswith("--run.name=") else "--run.name=one" for a in common]
    one = H.run_torchrun(
        one_args + ["--run.stages=sft", "--checkpoint.export_final=false", "--run.plots=false"]
    )
    # The padded reference path of the policy update, on 2 ranks (the shared-prefix default above).
    padded_args = [a if not a.startswith("--run.name=") else "--run.name=padded" for a in common]
    H.run_torchrun(
        padded_args + ["--grpo.shared_prefix=false", "--checkpoint.export_final=false", "--run.plots=false"],
        nproc=2,
    )
    return root / "runs", two, one


def test_run_directory_layout(two_rank_run):
    out, proc, _ = two_rank_run
    run = out / "two"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["name"] == "two" and cfg["sft"]["steps"] == H.SFT_STEPS
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("sft") == H.SFT_STEPS and kinds.count("grpo") == H.GRPO_STEPS
    grpo = [r for r in rows if r["kind"] == "grpo"]
    for r in grpo:
        for key in (
            "reward_mean",
            "zero_var_groups",
            "response_len",
            "time_rollout",
            "time_train",
            "peak_mem_mb",
        ):
            assert key in r, f"grpo row misses {key}: {sorted(r)}"
        assert r["groups"] == 2  # grpo.batch_size states over both ranks
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"step_{H.SFT_STEPS}",
        f"step_{H.SFT_STEPS + H.GRPO_STEPS}",
    ]
    assert (run / "plots" / "loss.png").is_file()
    assert "[fsdp] memory per rank" in proc.stdout and "fraction=0.5" in proc.stdout


def test_final_export_loads(two_rank_run):
    from singleturn.model import Tokenizer, load_hf_checkpoint

    out, _, _ = two_rank_run
    final = out / "two" / "final"
    model, cfg = load_hf_checkpoint(final, device="cpu", dtype=torch.float32)
    tok = Tokenizer.from_file(str(final / "tokenizer.json"))
    assert cfg.dim == 32 and cfg.n_layers == 1 and cfg.vocab_size == tok.vocab_size
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, cfg.vocab_size) and torch.isfinite(logits).all()


def test_two_ranks_equal_one_rank_on_sft(two_rank_run):
    out, _, _ = two_rank_run
    rows = {
        n: [json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("one", "two")
    }
    sft = {n: [r for r in rows[n] if r["kind"] == "sft"] for n in rows}
    assert len(sft["one"]) == len(sft["two"]) == H.SFT_STEPS
    for a, b in zip(sft["one"], sft["two"]):
        assert a["num_tokens"] == b["num_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6), f"step {a['step']}"


def test_shared_prefix_grpo_logs_the_padded_paths_losses_on_two_ranks(two_rank_run):
    """grpo.shared_prefix (default) vs the padded reference, seeded, 2 ranks of the hand FSDP: the
    same rollouts, the same per-step losses and statistics to 1e-5."""
    out, _, _ = two_rank_run
    rows = {
        n: [json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("two", "padded")
    }
    grpo = {n: [r for r in rows[n] if r["kind"] == "grpo"] for n in rows}
    assert len(grpo["two"]) == len(grpo["padded"]) == H.GRPO_STEPS
    trained = 0
    for a, b in zip(grpo["padded"], grpo["two"]):
        assert a["reward_mean"] == b["reward_mean"] and a["kept_sequences"] == b["kept_sequences"]
        for key in ("loss", "clip_frac", "ratio", "kl", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), f"step {a['step']} {key}"
        trained += not a.get("skipped")
    assert trained, "at least one GRPO step must train for the comparison to mean anything"


@pytest.fixture(scope="module")
def episode_runs(tmp_path_factory):
    """data.prompt='episode': SFT on whole expert episodes (token trees) then GRPO from the episode
    prompts, on 2 ranks (FSDP over the packed tree rows) and SFT alone on 1 rank."""
    root = tmp_path_factory.mktemp("episodes")
    states, tok = H.write_synthetic_inputs(root, n=30, episodic=True)  # 10 episodes of 3 steps
    common = H.tiny_args(root, states, tok, "ep2") + [
        "--data.prompt=episode",
        "--data.list_admissible=true",
        "--sft.batch_size=4",
        "--sft.max_tokens_per_micro_batch=256",  # several micro-batches per step (the rank padding path)
    ]
    two = H.run_torchrun(common, nproc=2)
    one_args = [a if not a.startswith("--run.name=") else "--run.name=ep1" for a in common]
    one = H.run_torchrun(one_args + ["--run.stages=sft"])
    return root / "runs", two, one


def test_episode_sft_on_two_ranks_equals_one_rank_and_grpo_runs(episode_runs):
    out, two, _ = episode_runs
    assert "[data] 10 expert episodes as token trees" in two.stdout
    r2, r1 = H.step_rows(out / "ep2"), H.step_rows(out / "ep1")
    for s in range(1, H.SFT_STEPS + 1):
        assert r2[s]["kind"] == "sft" and r2[s]["num_tokens"] == r1[s]["num_tokens"]
        assert r2[s]["loss"] == pytest.approx(r1[s]["loss"], rel=1e-4)
        assert r2[s]["action_prob"] == pytest.approx(r1[s]["action_prob"], rel=1e-4)
    grpo = [r for r in r2.values() if r["kind"] == "grpo"]
    assert len(grpo) == H.GRPO_STEPS and all(math.isfinite(r["loss"]) for r in grpo)
