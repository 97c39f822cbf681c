"""Slow: both experts on several games of every task type and split (run with `-m slow`)."""

import json

import pytest

from singleturn.harness import TASK_TYPES, evaluate, generate_games


@pytest.fixture(scope="module")
def many_games(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    return {
        split: generate_games(root / split, split, 3 * len(TASK_TYPES), seed=11, num_workers=2)
        for split in ("train", "valid_seen", "valid_unseen")
    }


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "valid_seen", "valid_unseen"])
@pytest.mark.parametrize("expert", ["handcoded", "planner"])
def test_both_experts_win_every_game(many_games, split, expert):
    games = many_games[split]
    types = [json.loads((g.parent / "traj_data.json").read_text())["task_type"] for g in games]
    assert sorted(set(types)) == sorted(TASK_TYPES) and len(games) == 18
    report = evaluate("expert", games, max_steps=50, num_workers=2, expert=expert)
    assert report.success_rate == 1.0, [e["game"] for e in report.episodes if not e["won"]]
    assert report.action_accuracy == 1.0 and report.env_failures == 0
    print(f"{split} {expert}: mean steps {report.mean_steps_success}, {report.meta['seconds']}s")
