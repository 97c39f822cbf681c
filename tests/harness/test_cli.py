"""`python -m harness generate | expert | evaluate` end to end on two games."""

import json
import os
import subprocess
import sys


def _run(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_generate_expert_evaluate(tmp_path):
    games = tmp_path / "games"
    out = _run(
        "generate",
        "--out",
        str(games),
        "--split",
        "valid_unseen",
        "--num-games",
        "2",
        "--seed",
        "5",
        "--task-types",
        "pick_and_place_simple",
        "pick_heat_then_place_in_recep",
    )
    assert out.startswith("2 games in") and "regenerated" in out
    states = tmp_path / "states.jsonl"
    out = _run("expert", "--games", str(games), "--out", str(states))
    rows = [json.loads(line) for line in states.read_text().splitlines()]
    assert out.startswith(f"{len(rows)} states from 2 games") and rows[0]["expert_action"] == "look"
    out = _run("evaluate", "--games", str(games), "--policy", "expert", "--out", str(tmp_path / "rep"))
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["success_rate"] == 1.0 and report["action_accuracy"] == 1.0
    assert "| **all** | 2 | 100.0% | 100.0% |" in out


def test_cli_evaluate_checkpoint_policy(tmp_path, train_games):
    """`--policy <checkpoint dir>` loads an HF checkpoint + tokenizer.json and decodes greedily."""
    import dataclasses

    from harness import collect_states, read_states, render_prompt
    from model import PRESETS, Transformer, save_hf_checkpoint, train_tokenizer

    states = tmp_path / "states.jsonl"
    collect_states(train_games[:1], states)
    rows = read_states(states)
    texts = [m["content"] for r in rows for m in render_prompt(r)] + [r["expert_action"] for r in rows]
    tok = train_tokenizer(texts, 300)
    cfg = dataclasses.replace(
        PRESETS["tiny"],
        vocab_size=tok.vocab_size,
        dim=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        ffn_dim=64,
        max_seq_len=256,
    )
    ckpt = tmp_path / "ckpt"
    save_hf_checkpoint(Transformer(cfg), ckpt)
    tok.save(ckpt / "tokenizer.json")
    out = _run(
        "evaluate", "--games", str(train_games[0].parents[2]), "--limit", "2", "--max-steps", "2",
        "--policy", str(ckpt), "--out", str(tmp_path / "rep"),
        env=dict(os.environ, OMP_NUM_THREADS="1"),  # a tiny model: threads only contend on a busy CPU
    )  # fmt: skip
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["meta"]["policy"] == str(ckpt) and len(report["episodes"]) == 2
    assert all(e["steps"] == 2 for e in report["episodes"]) and "| **all** | 2 |" in out
