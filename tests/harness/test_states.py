"""collect_states: the states.jsonl schema, history consistency, determinism, DAgger-style labelling."""

import json

from singleturn.harness import collect_states, read_states
from singleturn.harness.states import STATE_KEYS


def test_states_schema_and_history(train_games, tmp_path):
    out = tmp_path / "states.jsonl"
    n = collect_states(train_games, out)
    rows = read_states(out)
    assert n == len(rows) > 0
    walkthroughs = {str(g): json.loads(g.read_text())["walkthrough"] for g in train_games}
    assert n == sum(len(w) for w in walkthroughs.values())
    by_game = {}
    for row in rows:
        assert tuple(row) == STATE_KEYS
        assert isinstance(row["step"], int) and isinstance(row["history"], list)
        assert row["expert_action"] in row["admissible"]
        assert all(isinstance(a, str) for a in row["admissible"]) and row["goal"] and row["observation"]
        by_game.setdefault(row["game"], []).append(row)
    assert set(by_game) == set(walkthroughs)
    for game, steps in by_game.items():
        assert [r["step"] for r in steps] == list(range(len(steps)))
        assert [r["expert_action"] for r in steps] == walkthroughs[game]  # the expert's winning episode
        assert steps[0]["history"] == [] and "Welcome to TextWorld" in steps[0]["observation"]
        for prev, cur in zip(steps, steps[1:]):
            # history = every earlier (observation, action) pair
            assert cur["history"] == prev["history"] + [[prev["observation"], prev["expert_action"]]]
            assert cur["goal"] == prev["goal"] and cur["task_type"] == prev["task_type"]


def test_states_deterministic_across_workers(train_games, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    collect_states(train_games[:3], a, num_workers=1)
    collect_states(train_games[:3], b, num_workers=2)
    assert a.read_bytes() == b.read_bytes()


def test_dagger_labels_policy_states(train_games, tmp_path):
    """With a policy, the policy's visited states are written, each labelled by the expert."""
    out = tmp_path / "dagger.jsonl"
    prompts = []

    def always_look(batch):
        prompts.extend(batch)
        return ["Action: look"] * len(batch)

    played = []
    n = collect_states(train_games[:2], out, policy=always_look, max_steps=4, episodes=played)
    rows = read_states(out)
    assert n == len(rows) == 8 and len(prompts) == 8
    # The played episodes, in games order: 4 steps each of `look`, never won, no env failure.
    assert [e.game for e in played] == [str(g) for g in train_games[:2]]
    assert [(e.steps, e.won, e.failed) for e in played] == [(4, False, False)] * 2
    assert all(r["history"][-1][1] == "look" for r in rows if r["step"] > 0)
    assert all(r["expert_action"] in r["admissible"] for r in rows)
    assert prompts[0][0]["role"] == "system"  # the policy saw render_prompt messages
