"""The lower-bound check's numbers (trainer/bound.py) on a fixture worked out by hand: the teacher-forced
step accuracy (the seed's "action accuracy": the policy's pick at the expert's own states) and the
greedy / sampled bounds, with the expert's states asked in lockstep, games in batches."""

import math

import pytest

from singleturn.trainer.bound import summarize_bound
from singleturn.trainer.holdout import teacher_forced_actions


def _traj(game: str, actions: list[str]) -> list[dict]:
    return [
        {"game": game, "step": t, "expert_action": a, "admissible": [a, "look"]}
        for t, a in enumerate(actions)
    ]


class ScriptedPolicy:
    """Answers each state from a table; records every lockstep call's (game, step) list."""

    def __init__(self, table: dict):
        self.table, self.calls = table, []

    def act_states(self, states: list[dict]) -> list[str]:
        self.calls.append([(s["game"], s["step"]) for s in states])
        return [self.table[(s["game"], s["step"])] for s in states]


def test_teacher_forced_accuracy_and_bounds_by_hand():
    traj = {
        "a": _traj("a", ["go to desk 1", "take pen 1 from desk 1", "go to shelf 1"]),
        "b": _traj("b", ["open fridge 1", "take egg 1 from fridge 1"]),
        "c": [],  # the expert cannot win it within the step limit: it counts 0 in every bound
        "d": _traj("d", ["use desklamp 1"]),
    }
    table = {
        ("a", 0): "go to desk 1",
        ("a", 1): "take pen 1 from desk 1",
        ("a", 2): "look",  # wrong
        ("b", 0): "open fridge 1",
        ("b", 1): "take egg 1 from fridge 1",
        ("d", 0): "look",  # wrong
    }
    policy = ScriptedPolicy(table)
    picks = teacher_forced_actions(policy, traj, batch_size=2)
    # lockstep: games a and b together, turn by turn, then d; never the game without a trajectory
    assert policy.calls == [[("a", 0), ("b", 0)], [("a", 1), ("b", 1)], [("a", 2)], [("d", 0)]]
    states = [s for g in traj for s in traj[g]]
    greedy = [p == s["expert_action"] for p, s in zip(picks, states)]
    assert greedy == [True, True, False, True, True, False]
    logp = [-0.1, -0.2, -2.0, -0.5, -0.5, -1.0]
    out = summarize_bound(traj, logp, greedy)
    assert out["greedy_step_accuracy"] == pytest.approx(4 / 6)  # over states, not games
    assert out["bound_greedy"] == pytest.approx(1 / 4)  # only b replays the expert; 4 games
    want_sampled = (math.exp(-2.3) + math.exp(-1.0) + 0.0 + math.exp(-1.0)) / 4
    assert out["bound_sampled"] == pytest.approx(want_sampled)
    assert out["mean_step_prob"] == pytest.approx(sum(map(math.exp, logp)) / 6)
    assert out["per_game"]["c"] == {
        "steps": 0,
        "logp": [],
        "greedy": [],
        "bound_sampled": 0.0,
        "bound_greedy": 0.0,
    }
    with pytest.raises(ValueError, match="5 log-probs"):
        summarize_bound(traj, logp[:5], greedy[:5])


def test_the_check_uses_the_runs_own_evaluation_spec(tmp_path):
    """final/policy.json (what the run evaluated with, its dtype resolved where it ran) wins; without
    it the config's spec, with an "auto" dtype resolved on this machine (never passed on as "auto")."""
    from singleturn.model.policy import PolicySpec
    from singleturn.trainer.bound import eval_spec
    from singleturn.trainer.config import build_config

    cfg = build_config({"rollout": {"dtype": "auto"}, "eval": {"decoding": "rank"}})
    assert cfg.rollout.dtype == "auto"
    spec = eval_spec(tmp_path, cfg)
    assert spec.dtype in ("float32", "bfloat16") and spec.decoding == "rank"
    PolicySpec(decoding="greedy", dtype="bfloat16", batch_size=3).save(tmp_path)
    assert eval_spec(tmp_path, cfg) == PolicySpec(decoding="greedy", dtype="bfloat16", batch_size=3)
