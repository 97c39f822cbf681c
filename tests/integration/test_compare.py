"""The comparison driver end to end on a toy budget: every row (zero-shot, SFT, PPO, multi-turn GRPO,
single-turn GRPO, grpo-dagger) for two seeds (tiny model, 2 train games, 1 eval game, 1 step each), the
lower-bound check, the outputs, and a comparison killed in pieces and resumed."""

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("ALFWORLD_DATA", str(REPO / "data" / "alfworld"))

TOY = """
[compare]
base = "{base}"
methods = ["sft", "ppo", "grpo-multiturn", "grpo", "grpo-dagger"]
seeds = [0, 1]
sample_budget = 10
out_dir = "{out}"
bound_sampled_episodes = 1

[run]
log_every = 100
stages = ["lm", "sft", "grpo"]

[data]
games_dir = "{games}"
train_games = 2
eval_games = 1
eval_splits = ["valid_unseen"]
vocab_size = 320
max_seq_len = 1024

[model]
dim = 32
n_layers = 1
n_heads = 2
n_kv_heads = 1
ffn_dim = 64
max_seq_len = 1024

[lm]
steps = 1
batch_size = 4
micro_batch_size = 4

[sft]
steps = 2
batch_size = 4
micro_batch_size = 4

[rollout]
group_size = 2
max_new_tokens = 4

[grpo]
batch_size = 4
micro_batch_size = 8
oversample = 1

[ppo]
episodes_per_step = 4
max_steps = 2
num_workers = 1

[grpo_multiturn]
episodes_per_step = 4
group_size = 2
max_steps = 2
num_workers = 1

[dagger]
every = 1
episodes = 1
max_steps = 2
num_workers = 1
mix_ratio = 0.5
pool_size = 8

[eval]
max_steps = 10
num_workers = 1
max_new_tokens = 4
zero_shot = true

[checkpoint]
every = 0
"""


def test_compare_toy_budget(tmp_path, capsys):
    from singleturn.trainer.compare import load_compare_config, plan_runs, rl_steps, run_comparison

    cfg = tmp_path / "compare.toml"
    out = tmp_path / "cmp"
    cfg.write_text(TOY.format(base=REPO / "configs/tiny-cpu.toml", out=out, games=tmp_path / "games"))
    cc, raw = load_compare_config(cfg)
    assert rl_steps("grpo", raw, 8) == (1, 8) and rl_steps("ppo", raw, 8) == (1, 8)
    over = {**raw, "grpo": {**raw["grpo"], "oversample": 3}}
    assert rl_steps("grpo", over, 48) == (2, 24), "dynamic sampling: every drawn sample counts"
    assert rl_steps("grpo-dagger", raw, 10) == (1, 10), "grpo's 8 + the play's 1 episode x 2 steps / K=1"
    specs = plan_runs(cc, raw)
    methods = ["sft", "ppo", "grpo-multiturn", "grpo", "grpo-dagger"]
    assert [s.name for s in specs] == [f"{m}-s{seed}" for seed in (0, 1) for m in methods]
    assert specs[1].raw["model"]["path"] == str(out / "sft-s0" / "final")
    assert specs[6].raw["model"]["path"] == str(out / "sft-s1" / "final")
    assert specs[0].raw["run"]["stages"] == ["lm", "sft"], "the SFT run keeps the base's pre-RL stages"

    doc = run_comparison(str(cfg))
    first = capsys.readouterr().out
    assert "report written with 1 runs; pending: ppo-s0, grpo-multiturn-s0" in first, "a report per piece"
    assert doc["meta"]["pending"] == [] and doc["meta"]["piece_seconds"] > 0
    assert list(doc["summary"]) == ["zero-shot", *methods], "every row"
    assert all(row["seeds"] == [0, 1] for row in doc["summary"].values()), (
        "from scratch: a zero-shot per seed"
    )
    assert {r["run"] for r in doc["runs"]} == {s.name for s in specs}
    runs = {r["method"]: r for r in doc["runs"] if r["seed"] == 0}
    assert runs["grpo"]["samples"] == 8 and runs["grpo"]["env_steps"] == 0
    _check_dagger_run(out, runs["grpo-dagger"])
    assert 0 < runs["ppo"]["samples"] <= 8 and runs["ppo"]["env_steps"] == runs["ppo"]["samples"]
    assert runs["grpo-multiturn"]["steps"] == 1
    assert runs["sft"]["steps"] == 3 and runs["sft"]["stages"] == ["lm", "sft"]
    for r in doc["runs"]:
        b = r["bound"]
        assert 0.0 <= b["bound_sampled"] <= 1.0 and b["per_game"], r["run"]
        steps = [v for v in b["per_game"].values() if v["steps"]]
        assert steps and all(-1e4 < lp <= 0.0 for v in steps for lp in v["logp"])
        assert len(steps[0]["logp"]) == len(steps[0]["greedy"]) == steps[0]["steps"]
        assert r["bound_check"]["greedy_ok"] and "sampled_ok" in r["bound_check"]
    assert runs["ppo"]["tokens_per_gpu"] > 0 and runs["sft"]["tokens_per_gpu"] > 0
    _check_greedy_bound_scores_the_eval_policy(out, runs["grpo"])
    _check_harness_cli_reproduces_the_eval(out / "grpo-s0", "grpo", tmp_path / "games" / "valid_unseen")
    md = (out / "comparison.md").read_text()
    assert "PPO (multi-turn)" in md and "Lower-bound check" in md
    assert json.loads((out / "comparison.json").read_text())["meta"]["budget_unit"].startswith("sampled")
    assert (out / "plots" / "accuracy_vs_success.png").stat().st_size > 1000
    # A second call reuses every finished run and bound, and prints the same table.
    again = run_comparison(str(cfg))
    assert [r["success_rate"] for r in again["runs"]] == [r["success_rate"] for r in doc["runs"]]
    assert (out / "comparison.md").read_text() == md
    assert capsys.readouterr().out.count("done, reusing") == len(specs)
    # A run killed in its final evaluation (after its last checkpoint; final/ and eval/grpo.json not
    # yet written) is resumed, not refused as "already holds a run", and redoes only what was missing.
    killed = out / "grpo-s0"
    shutil.rmtree(killed / "final")
    (killed / "eval" / "grpo.json").unlink()
    (killed / "eval" / "bound.json").unlink()
    sft_mtime = (out / "sft-s0" / "final" / "config.json").stat().st_mtime_ns
    resumed = run_comparison(str(cfg))
    assert (killed / "final" / "config.json").exists() and (killed / "eval" / "grpo.json").exists()
    assert (out / "sft-s0" / "final" / "config.json").stat().st_mtime_ns == sft_mtime, "SFT redone"
    keys = ("run", "success_rate", "action_accuracy", "episodes", "samples", "env_steps", "steps")
    assert [[r[k] for k in keys] for r in resumed["runs"]] == [[r[k] for k in keys] for r in doc["runs"]]
    printed = capsys.readouterr().out
    assert "[compare] grpo-s0: resuming" in printed and printed.count("done, reusing") == len(specs) - 1
    assert printed.count("teacher-forced step accuracy") == 1, "only the killed run's bound is redone"
    assert (out / "comparison.md").read_text() == md, "the resumed comparison prints the same table"


@pytest.mark.parametrize(
    "name",
    [
        "compare-tiny-cpu",
        "compare-smollm2-135m-cpu",
        "compare-smollm2-135m-cpu-sft3ep",
        "compare-llama3-1b",
        "compare-llama3-8b",
    ],
)
def test_shipped_compare_configs_parse(name, tmp_path):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from singleturn.trainer.compare import load_compare_config, plan_runs
    from singleturn.trainer.config import dump_toml

    path = REPO / "configs" / f"{name}.toml"
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    raw["compare"]["base"] = str(REPO / raw["compare"]["base"])
    if "llama" in name:  # GPU configs need a real HF model dir: point model.path at a fake one
        hf = tmp_path / "hf"
        hf.mkdir()
        (hf / "config.json").write_text("{}")
        (hf / "tokenizer.json").write_text("{}")
        raw.setdefault("model", {})["path"] = str(hf)
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_toml(raw))
    cc, raw = load_compare_config(path)
    specs = plan_runs(cc, raw)
    assert len(specs) == len(cc.seeds) * (1 + len([m for m in cc.methods if m != "sft"]))
    assert all(s.raw["run"]["out_dir"] == cc.out_dir for s in specs)
    for s in specs:  # every RL row starts from its seed's SFT export, never from the base's wheel
        if s.method != "sft":
            model = s.raw["model"]
            assert model["path"] == str(Path(cc.out_dir) / f"sft-s{s.seed}" / "final")
            assert not model.get("gguf_wheel") and not model.get("gguf_member")


def _check_dagger_run(out, run):
    """One step with a refresh first (K = 1): the policy played 1 train game (<= 2 env steps), its
    states joined the pool and half the batch; its play decisions count as samples, within budget."""
    from singleturn.trainer.metrics import read_metrics

    assert run["steps"] == 1 and 0 < run["env_steps"] <= 2 and 8 < run["samples"] <= 10, run
    (row,) = [
        r for r in read_metrics(out / "grpo-dagger-s0" / "metrics.jsonl") if r.get("kind") == "grpo-dagger"
    ]
    assert row["dagger_episodes"] == 1 and row["pool_size"] == row["dagger_added"] > 0
    assert row["policy_states"] == min(2, row["pool_size"]) and row["samples"] == run["samples"]


def _check_greedy_bound_scores_the_eval_policy(out, run):
    """g_t is the evaluation's own deterministic action (the base's eval.decoding = rank) == expert:
    ranking each state's whole window prompt, cache-free."""
    import torch

    from singleturn.harness import read_states, render_prompt
    from singleturn.model import Tokenizer, load_hf_checkpoint
    from singleturn.model.generate import score_continuations

    final = out / run["run"] / "final"
    model, _ = load_hf_checkpoint(final, device=torch.device("cpu"), dtype=torch.float32)
    tok = Tokenizer.from_file(str(final / "tokenizer.json"))
    states = read_states(out / "bound-expert-states.jsonl")
    want = {}
    with torch.no_grad():
        for s in states:
            prompt = tok.apply_chat_template(render_prompt(s, 2, False), add_generation_prompt=True)
            cands = [tok.encode(a) + [tok.eot_id] for a in s["admissible"]]
            scores = score_continuations(model, [prompt], [cands])[0]
            pick = s["admissible"][max(range(len(cands)), key=scores.__getitem__)]
            want.setdefault(s["game"], []).append(pick == s["expert_action"])
    got = {g: v["greedy"] for g, v in run["bound"]["per_game"].items() if v["steps"]}
    assert got == {g: w for g, w in want.items() if g in got} and got


def _check_harness_cli_reproduces_the_eval(run_dir, label, games):
    """`python -m singleturn.harness evaluate --policy RUN/final` plays exactly the policy the trainer evaluated
    (final/policy.json: ranked decoding, history 2, no system prompt, the eval step limit), so its
    report equals the trainer's eval/<label>.json episode for episode."""
    import subprocess
    import sys

    spec = json.loads((run_dir / "final" / "policy.json").read_text())
    assert spec["decoding"] == "rank" and spec["history_window"] == 2 and spec["system_prompt"] is False
    out = run_dir / "cli-eval"
    cmd = [
        sys.executable,
        "-m",
        "singleturn.harness",
        "evaluate",
        "--policy",
        str(run_dir / "final"),
        "--games",
        str(games),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.with_suffix(".json").read_text())
    want = json.loads((run_dir / "eval" / f"{label}.json").read_text())
    for key in ("success_rate", "action_accuracy", "mean_steps_success", "invalid_action_rate"):
        assert got[key] == want[key], key
    strip = lambda eps: [{k: v for k, v in e.items() if "time" not in k and "second" not in k} for e in eps]  # noqa: E731
    assert strip(got["episodes"]) == strip(want["episodes"])
