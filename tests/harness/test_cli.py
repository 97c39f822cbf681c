"""`python -m singleturn.harness generate | expert | evaluate` end to end on two games."""

import json
import os
import subprocess
import sys

import pytest


def _run(*args, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", "singleturn.harness", *args], capture_output=True, text=True, env=env
    )
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

    from singleturn.harness import collect_states, read_states, render_prompt
    from singleturn.model import PRESETS, Transformer, save_hf_checkpoint, train_tokenizer

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
        "evaluate",
        "--games",
        str(train_games[0].parents[2]),
        "--limit",
        "2",
        "--max-steps",
        "2",
        "--policy",
        str(ckpt),
        "--out",
        str(tmp_path / "rep"),
        env=dict(os.environ, OMP_NUM_THREADS="1"),  # a tiny model: threads only contend on a busy CPU
    )
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["meta"]["policy"] == str(ckpt) and len(report["episodes"]) == 2
    assert all(e["steps"] == 2 for e in report["episodes"]) and "| **all** | 2 |" in out


def test_cli_skips_unreadable_games_and_names_them(tmp_path, train_games):
    """One good game among an invalid-JSON game.tw-pddl and a dangling one: `expert` and `evaluate`
    play the good game and report the two they skipped (they used to abort on the first)."""
    import shutil

    root = tmp_path / "games"
    good = root / "good" / "trial_0"
    shutil.copytree(train_games[0].parent, good)
    bad = root / "bad" / "trial_0"
    bad.mkdir(parents=True)
    shutil.copy(good / "traj_data.json", bad / "traj_data.json")
    (bad / "game.tw-pddl").write_text((good / "game.tw-pddl").read_text()[:-40])  # a truncated copy
    gone = root / "gone" / "trial_0"
    gone.mkdir(parents=True)
    shutil.copy(good / "traj_data.json", gone / "traj_data.json")
    (gone / "game.tw-pddl").symlink_to(tmp_path / "deleted.tw-pddl")  # a dangling link: missing
    skipped = (
        f"skipped 2 unreadable games: {bad / 'game.tw-pddl'} (invalid JSON: "
        f"Unterminated string starting at: line"
    )
    states = tmp_path / "states.jsonl"
    out = _run("expert", "--games", str(root), "--out", str(states))
    assert skipped in out and f"{gone / 'game.tw-pddl'} (unreadable: No such file or directory)" in out, out
    assert f"states from 1 games -> {states}" in out, out
    out = _run("evaluate", "--games", str(root), "--policy", "expert", "--max-steps", "30")
    assert skipped in out and "| **all** | 1 | 100.0% |" in out, out


@pytest.mark.parametrize(
    "args, flag, why",
    [
        (["evaluate", "--max-steps", "0"], "--max-steps", "must be at least 1, got 0"),
        (["evaluate", "--max-steps", "-1"], "--max-steps", "must be at least 1, got -1"),
        (["evaluate", "--workers", "0"], "--workers", "must be at least 1, got 0"),
        (["evaluate", "--limit", "-1"], "--limit", "must be at least 1, got -1"),
        (["evaluate", "--limit", "0"], "--limit", "must be at least 1, got 0"),
        (["evaluate", "--history-window", "-2"], "--history-window", "must be at least 0, got -2"),
        (["evaluate", "--max-steps", "ten"], "--max-steps", "expected an integer, got 'ten'"),
        (["expert", "--out", "x.jsonl", "--beta", "1.5"], "--beta", "must be in [0, 1], got 1.5"),
        (
            ["generate", "--out", "g", "--split", "train", "--num-games", "0"],
            "--num-games",
            "must be at least 1, got 0",
        ),
        (
            ["generate", "--out", "g", "--split", "train", "--num-games", "1", "--max-expert-steps", "0"],
            "--max-expert-steps",
            "must be at least 1, got 0",
        ),
    ],
)
def test_cli_rejects_meaningless_numbers(tmp_path, args, flag, why):
    """Issue 23, fault 6: `--max-steps 0` exited 0 with an accuracy, `--workers 0` reported unplayed
    episodes as lost, `--limit -1` dropped the last game. Each is a one-line usage error (exit 2)
    before any game is loaded or file written."""
    games = [] if args[0] == "generate" else ["--games", str(tmp_path)]
    policy = ["--policy", "random"] if args[0] == "evaluate" else []
    proc = subprocess.run(
        [sys.executable, "-m", "singleturn.harness", *args, *games, *policy],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"argument {flag}: {why}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_run_episodes_rejects_zero_steps_and_workers():
    from singleturn.harness.rollout import run_episodes

    with pytest.raises(ValueError, match="max_steps must be at least 1, got 0"):
        run_episodes(["g"], lambda states: [], max_steps=0)
    with pytest.raises(ValueError, match="num_workers must be at least 1, got 0"):
        run_episodes(["g"], lambda states: [], num_workers=0)


def _refused(*args, cwd=None):
    """Run the CLI expecting an expected failure: exit 2, one line on stderr, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "SINGLETURN_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "singleturn.harness", *args], capture_output=True, text=True, env=env, cwd=cwd
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_cli_expected_failures_are_one_line_errors(tmp_path, train_games):
    """Issue 23, fault 10: a truncated checkpoint, a generation the expert cannot win and an empty
    games directory each print one `error:` line and exit 2 (they printed tracebacks, or exit 1)."""
    import shutil

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # cut in its header
    games = tmp_path / "games"
    shutil.copytree(train_games[0].parent, games / "g" / "trial_0")
    err = _refused("evaluate", "--games", str(games), "--policy", str(ckpt))
    assert f"checkpoint {ckpt} does not load" in err, err
    out = tmp_path / "unwinnable"
    err = _refused(
        "generate",
        "--out",
        str(out),
        "--split",
        "valid_seen",
        "--num-games",
        "1",
        "--task-types",
        "pick_and_place_simple",
        "--max-expert-steps",
        "1",
    )
    assert "max_expert_steps=1" in err and not out.exists(), err
    (tmp_path / "empty").mkdir()
    assert "no games found under" in _refused(
        "evaluate", "--games", str(tmp_path / "empty"), "--policy", "random"
    )
