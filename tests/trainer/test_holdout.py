"""Held-out teacher-forced agreement during training (trainer/holdout.py): the states' checks, the
leak refusal, the summary by hand, and through `torchrun trainer/main.py` (2 ranks, episode format,
ranked decoding): rows at the due steps whose per-state matches equal an independent recomputation
from the exported final weights, a leaking holdout refused before training, and a run stopped after
a holdout step and resumed that keeps each row exactly once."""

import json
import sys
from pathlib import Path

import pytest

from singleturn.trainer.config import ConfigError
from singleturn.trainer.holdout import (
    agreement_matches,
    check_disjoint,
    episode_key,
    summarize,
    teacher_forced_actions,
    trajectories,
)
from singleturn.trainer.stats import wilson_interval
from singleturn.trainer.synthetic import write_synthetic_inputs


def _load_resume_helpers():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_resume_helpers", Path(__file__).resolve().parent / "test_resume.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_resume_helpers", mod)
    spec.loader.exec_module(mod)
    return mod


H = _load_resume_helpers()


def _state(game, step, obs="o", action="look", goal="g"):
    return {
        "game": game,
        "step": step,
        "goal": goal,
        "observation": obs,
        "expert_action": action,
        "admissible": ["look", "inventory", "go to desk 1"],
        "history": [],
    }


def test_trajectories_group_in_step_order_and_refuse_split_or_unordered_games():
    rows = [_state("a", 0), _state("a", 1), _state("b", 0)]
    assert {g: [s["step"] for s in v] for g, v in trajectories(rows).items()} == {"a": [0, 1], "b": [0]}
    with pytest.raises(ConfigError, match="not contiguous"):
        trajectories([_state("a", 0), _state("b", 0), _state("a", 1)])
    with pytest.raises(ConfigError, match="has step 2, expected 1"):
        trajectories([_state("a", 0), _state("a", 2)])


def test_check_disjoint_refuses_a_shared_game_path_or_the_same_episode_under_another_path():
    held = trajectories([_state("h/0", 0, "x"), _state("h/0", 1, "y", "inventory")])
    check_disjoint(held, [_state("t/0", 0, "x"), _state("t/0", 1, "y", "look")], "f")  # another action
    with pytest.raises(ConfigError, match="1 of its 1 episodes are in the training data"):
        check_disjoint(held, [_state("h/0", 0, "other")], "f")  # the same game path
    copy = [dict(s, game="t/9") for s in held["h/0"]]
    assert episode_key(copy) == episode_key(held["h/0"])
    with pytest.raises(ConfigError, match="in the training data"):
        check_disjoint(held, [_state("t/1", 0)] + copy, "f")  # the same episode, renamed


def test_summarize_by_hand():
    got = summarize([True, True, False, True])
    assert got["agreement"] == 0.75 and got["states"] == 4 and got["matches"] == "1101"
    assert (got["agreement_lo"], got["agreement_hi"]) == wilson_interval(3, 4)


class _ScriptedPolicy:
    """Plays the expert's action on even steps and 'go to desk 1' (or unparseable text) on odd ones;
    records each lockstep call's (game, step) list."""

    def __init__(self):
        self.calls = []

    def act_states(self, states):
        self.calls.append([(s["game"], s["step"]) for s in states])
        return [
            s["expert_action"] if s["step"] % 2 == 0 else ("go to desk 1" if s["game"] == "a" else "??")
            for s in states
        ]


def test_agreement_matches_follow_trajectory_order_in_lockstep_batches():
    rows = [_state("a", t) for t in range(3)] + [_state("b", t) for t in range(2)] + [_state("c", 0)]
    traj = trajectories(rows)
    policy = _ScriptedPolicy()
    assert agreement_matches(policy, traj, batch_size=2) == [True, False, True, True, False, True]
    # games a, b in lockstep (3 turns, b drops out after 2), then c alone
    assert policy.calls == [[("a", 0), ("b", 0)], [("a", 1), ("b", 1)], [("a", 2)], [("c", 0)]]
    assert teacher_forced_actions(_ScriptedPolicy(), traj, 8)[1] == "go to desk 1"


# ------------------------------------------------------------------------------- through main.py
SFT_STEPS = 28  # at sft.lr 1e-2 the last row's picks differ from the earlier rows' (checked below)


def _inputs(root: Path):
    states, tok = write_synthetic_inputs(root, n=24, episodic=True)  # 8 training episodes of 3 steps
    (root / "other").mkdir()
    other, _ = write_synthetic_inputs(root / "other", n=12, seed=5, episodic=True)
    held = [
        dict(json.loads(x), game=json.loads(x)["game"].replace("synthetic/", "heldout/"))
        for x in other.read_text().splitlines()
    ]
    held_path = root / "heldout.jsonl"
    held_path.write_text("".join(json.dumps(r) + "\n" for r in held))
    return states, tok, held_path


def _args(root, states, tok, held, name):
    args = H.tiny_args(root, states, tok, name) + [
        "--data.prompt=episode",
        "--sft.batch_size=4",
        "--run.stages=sft",
        "--eval.decoding=rank",
        "--eval.constrained=true",
        f"--eval.holdout_states={held}",
        "--eval.holdout_every=8",
        "--checkpoint.every=8",
        f"--sft.steps={SFT_STEPS}",
        "--sft.lr=1e-2",
    ]
    return [a for a in args if not a.startswith("--checkpoint.export_final")]


def _holdout_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "holdout"]


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    states, tok, held = _inputs(root)
    proc = H.run_torchrun(_args(root, states, tok, held, "two"), nproc=2)
    return root, states, tok, held, proc


def test_holdout_rows_at_due_steps_equal_a_recomputation_from_the_exported_weights(holdout_run):
    from singleturn.harness import read_states
    from singleturn.model import Tokenizer, load_hf_checkpoint
    from singleturn.model.policy import DTYPES, PolicySpec

    root, _, _, held, proc = holdout_run
    run_dir = root / "runs" / "two"
    rows = _holdout_rows(run_dir)
    assert [(r["stage"], r["step"]) for r in rows] == [("sft", 8), ("sft", 16), ("sft", 24), ("sft", 28)]
    assert "[holdout] sft @ step 28: agreement" in proc.stdout
    last = rows[-1]
    assert last["states"] == 12 and len(last["matches"]) == 12
    assert last["matches"] != rows[0]["matches"]  # the rows measure the weights of their step

    final = run_dir / "final"
    spec = PolicySpec.load(final)
    model, _ = load_hf_checkpoint(final, dtype=DTYPES[spec.dtype])
    policy = spec.policy(model, Tokenizer.from_file(final))
    want = agreement_matches(policy, trajectories(read_states(held)), spec.batch_size)
    policy.close()
    assert last["matches"] == "".join("1" if m else "0" for m in want)
    assert last["agreement"] == sum(want) / 12


def test_a_leaking_holdout_is_refused_before_training(holdout_run):
    root, states, tok, _, _ = holdout_run
    args = [a for a in _args(root, states, tok, states, "leak")]
    import os
    import subprocess

    cmd = [str(H.TORCHRUN), "--standalone", "--nproc_per_node=1", str(H.REPO / "trainer/main.py"), *args]
    proc = subprocess.run(
        cmd,
        cwd=H.REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0  # the worker exits 2 (config error); torchrun reports 1
    assert "8 of its 8 episodes are in the training data" in proc.stdout + proc.stderr
    assert not (root / "runs" / "leak" / "metrics.jsonl").exists()


def test_stopped_after_a_holdout_step_and_resumed_keeps_each_row_once(holdout_run):
    root, states, tok, held, _ = holdout_run
    args = _args(root, states, tok, held, "stop")
    H.run_torchrun(args + ["--run.stop_after_step=16"])
    assert [r["step"] for r in _holdout_rows(root / "runs" / "stop")] == [8, 16]
    H.run_torchrun(args + ["--resume"])
    rows = _holdout_rows(root / "runs" / "stop")
    assert [r["step"] for r in rows] == [8, 16, 24, 28]
