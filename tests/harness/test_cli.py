"""`python -m harness generate | expert | evaluate` end to end on two games."""

import json
import subprocess
import sys


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True)
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
