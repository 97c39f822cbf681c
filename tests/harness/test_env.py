"""The env stack: the 'move X to Y' expert fix, the caches (byte-identical play), sys.argv, expert seeding."""

import json
import os
import subprocess
import sys

import pytest

from singleturn.harness.env import AlfredGame, expert_patch_installed, install_expert_patch
from singleturn.harness.games import play_expert

# Plays random admissible actions (seeded) and prints every observation + admissible list.
_TRANSCRIPT = """
import json, random, sys
caches, paths, steps = sys.argv[1] == "1", json.loads(sys.argv[2]), int(sys.argv[3])  # before loading
from singleturn.harness.env import AlfredGame
game = AlfredGame("handcoded", caches=caches)
out = []
for path in paths:
    game.load(path)
    res = game.reset(seed=0)
    rng = random.Random(0)
    out.append([res.observation, res.admissible, res.expert_action])
    for _ in range(steps):
        res = game.step(rng.choice(res.admissible))
        out.append([res.observation, res.admissible, res.won, res.expert_action])
print(json.dumps(out))
"""


def _transcripts(games, steps: int):
    """(cached, stock) transcripts, produced concurrently in two fresh processes."""
    env = dict(os.environ, HARNESS_CACHE_DIR="")  # memory caches only: the disk layer is tested apart
    paths = json.dumps([str(g) for g in games])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TRANSCRIPT, flag, paths, str(steps)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for flag in ("1", "0")
    ]
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    return [json.loads(o) for o in outs]


def _assert_same(cached, stock):
    assert len(cached) == len(stock)
    for i, (a, b) in enumerate(zip(cached, stock)):
        assert a == b, f"entry {i} differs:\ncached={a}\nstock={b}"


def test_caches_keep_play_byte_identical(train_games):
    games = [train_games[1], train_games[5]]  # look_at (lamp grammar), pick_two (placements)
    cached, stock = _transcripts(games, 8)
    assert len(cached) == 18
    _assert_same(cached, stock)


@pytest.mark.slow
def test_caches_keep_play_byte_identical_many(train_games, unseen_games):
    _assert_same(*_transcripts(train_games + unseen_games, 40))


def test_disk_cache_round_trip(train_games, tmp_path, monkeypatch):
    """A game loaded from the pickled logic/translation plays exactly like a fresh load."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    from singleturn.harness.env import clear_memory_caches

    clear_memory_caches()  # an earlier test in this process may have loaded the same game in memory
    game = AlfredGame("handcoded")
    game.load(train_games[2])
    first = play_expert(game, train_games[2], 50)
    assert any((tmp_path / "sas").iterdir()) and any((tmp_path / "logic").iterdir())
    clear_memory_caches()  # the second load must come from the pickles
    again = AlfredGame("handcoded")
    again.load(train_games[2])
    assert play_expert(again, train_games[2], 50) == first is not None


def test_loading_preserves_sys_argv(train_games):
    before = list(sys.argv)
    game = AlfredGame("planner")
    game.load(train_games[0])
    game.reset(seed=0)
    assert sys.argv == before


def _first_placement(game, path):
    """Play the expert's winning walkthrough up to its first placement; the expert's inventory then."""
    walkthrough = json.loads(path.read_text())["walkthrough"]
    game.load(path)
    game.reset(seed=0)
    for action in walkthrough:
        game.step(action)
        if action.startswith("move "):
            return action, list(game._env._handcoded_expert.policy.inventory)
    raise AssertionError("no placement in the walkthrough")


def test_move_patch_fixes_expert_state_tracking(train_games):
    pick_two = train_games[5]
    game = AlfredGame("handcoded")
    try:
        install_expert_patch(False)
        action, inventory = _first_placement(game, pick_two)
        # The bug: after 'move X to Y' the unpatched expert still believes it holds X ...
        assert inventory == [action.split(" to ")[0][len("move ") :]]
        # ... so on pick_two_obj_and_place it never picks up the second object.
        assert play_expert(game, pick_two, max_steps=50) is None
    finally:
        install_expert_patch(True)
    assert expert_patch_installed()
    action, inventory = _first_placement(game, pick_two)
    assert inventory == []
    assert play_expert(game, pick_two, max_steps=50) is not None


def test_expert_type_is_honoured(train_games):
    """ALFWorld passes expert_type positionally (silently handcoded); ours really plans."""
    planner, handcoded = AlfredGame("planner"), AlfredGame("handcoded")
    for game in (planner, handcoded):
        game.load(train_games[0])
    assert handcoded.reset(seed=0).expert_action == "look"  # the handcoded expert always looks first
    assert planner.reset(seed=0).expert_action.startswith("go to ")


def _expert_actions(game, seed, other=None):
    """The expert's episode from reset(seed); `other` (a live game) steps in between each step."""
    res, actions = game.reset(seed=seed), []
    while not res.won and len(actions) < 50:
        actions.append(res.expert_action)
        res = game.step(res.expert_action)
        if other is not None and not other[1].won and other[1].expert_action:
            other[1] = other[0].step(other[1].expert_action)  # consumes randomness in between
    return actions


def test_expert_seeded_per_episode(train_games):
    """Interleaving two episodes in one process does not change either expert's choices."""
    g = train_games[5]
    a, b, ref = AlfredGame("handcoded"), AlfredGame("handcoded"), AlfredGame("handcoded")
    for game in (a, b, ref):
        game.load(g)
    alone = _expert_actions(ref, seed=123)
    interleaved = _expert_actions(a, seed=123, other=[b, b.reset(seed=456)])
    assert interleaved == alone and len(alone) < 50
