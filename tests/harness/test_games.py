"""Game generation: ALFWorld's format and semantics, disjoint splits, determinism, reuse, discovery."""

import json
import shutil

import pytest

from singleturn.harness import TASK_TYPES, find_games, generate_games
from singleturn.harness.env import AlfredGame
from singleturn.harness.games import GenConfig, GenerationError, generation_dir, play_expert
from singleturn.harness.scenes import (
    SPLIT_FLOORPLANS,
    TRAIN_FLOORPLANS,
    UNSEEN_FLOORPLANS,
    load_scene,
    room_type,
)


def _traj(game):
    return json.loads((game.parent / "traj_data.json").read_text())


def test_split_floorplans_disjoint_and_cover_room_types():
    assert not set(TRAIN_FLOORPLANS) & set(UNSEEN_FLOORPLANS)
    assert SPLIT_FLOORPLANS["valid_seen"] == SPLIT_FLOORPLANS["train"]
    for plans in (TRAIN_FLOORPLANS, UNSEEN_FLOORPLANS):
        assert {room_type(n) for n in plans} == {"Kitchen", "LivingRoom", "Bedroom", "Bathroom"}
    assert len(TRAIN_FLOORPLANS) + len(UNSEEN_FLOORPLANS) == 120


def test_scene_has_one_receptacle_per_location():
    for n in (1, 201, 301, 401, 13):
        scene = load_scene(n)
        locations = [r.location for r in scene.receptacles]
        assert len(locations) == len(set(locations)), n
        for r in scene.receptacles:
            if r.cls == "SinkBasin":  # ALFWorld's demangler needs THOR's Sink|x|y|z|SinkBasin form
                assert r.thor_id.startswith("Sink|") and r.thor_id.endswith("|SinkBasin")


def test_generated_games_have_alfworld_format(train_games):
    assert [_traj(g)["task_type"] for g in train_games] == list(TASK_TYPES)
    for g in train_games:
        data = json.loads(g.read_text())
        assert data["solvable"] is True
        assert "UNKNOWN GOAL" not in data["grammar"]
        goal = _traj(g)["turk_annotations"]["anns"][0]["task_desc"]
        assert f"Your task is to: {goal}." in data["grammar"]
        assert "(:domain alfred)" in data["pddl_problem"]
        for const in ("SinkBasinType", "MicrowaveType", "FridgeType", "KnifeType", "ButterKnifeType"):
            assert f"{const} - " in data["pddl_problem"], const
        params = _traj(g)["pddl_params"]
        assert params["object_target"] and (params["parent_target"] or params["toggle_target"])
        assert g.parent.parent.name.startswith(_traj(g)["task_type"] + "-")
        assert _traj(g)["harness"]["expert_steps"]["handcoded"] == len(data["walkthrough"])


def test_target_never_starts_inside_parent_type(train_games):
    for g in train_games:
        problem = json.loads(g.read_text())["pddl_problem"]
        params = _traj(g)["pddl_params"]
        if not params["parent_target"]:
            continue
        for line in problem.splitlines():
            line = line.strip()
            if line.startswith(f"(inReceptacle {params['object_target']}_bar_"):
                assert not line.split()[2].startswith(params["parent_target"] + "_bar_"), line


def test_generated_games_played_and_won_by_handcoded_expert(train_games):
    game = AlfredGame("handcoded")
    for g in train_games:
        game.load(g)
        walkthrough = play_expert(game, g, max_steps=50)
        assert walkthrough == json.loads(g.read_text())["walkthrough"], g.parent.parent.name


def test_pair_solved_by_planner(train_games):
    """The planner (fast-downward, full knowledge) wins and is never longer than the handcoded expert."""
    game = AlfredGame("planner")
    for g in (train_games[0], train_games[5]):  # pick_and_place_simple, pick_two_obj_and_place
        game.load(g)
        plan = play_expert(game, g, max_steps=50)
        assert plan is not None, g.parent.parent.name
        assert len(plan) <= _traj(g)["harness"]["expert_steps"]["handcoded"]


def test_unseen_split_uses_only_unseen_floorplans(unseen_games, train_games):
    unseen = {_traj(g)["scene"]["scene_num"] for g in unseen_games}
    train = {_traj(g)["scene"]["scene_num"] for g in train_games}
    assert unseen <= set(UNSEEN_FLOORPLANS) and train <= set(TRAIN_FLOORPLANS)
    assert [_traj(g)["task_type"] for g in unseen_games] == list(TASK_TYPES)


def test_same_seed_same_games_and_reuse(tmp_path):
    a = generate_games(tmp_path / "a", "valid_seen", 2, seed=7, task_types=TASK_TYPES[:2])
    b = generate_games(tmp_path / "b", "valid_seen", 2, seed=7, task_types=TASK_TYPES[:2])
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
        assert (pa.parent / "traj_data.json").read_bytes() == (pb.parent / "traj_data.json").read_bytes()
    # Re-running with the same arguments reuses the games (no file is rewritten).
    mtimes = [p.stat().st_mtime_ns for p in a]
    again = generate_games(tmp_path / "a", "valid_seen", 2, seed=7, task_types=TASK_TYPES[:2])
    assert again == a and [p.stat().st_mtime_ns for p in a] == mtimes
    # Another seed in the same folder is refused, and deletes nothing: another run may read those games.
    with pytest.raises(GenerationError, match=r"other arguments \(seed: 7 -> 8\)"):
        generate_games(tmp_path / "a", "valid_seen", 2, seed=8, task_types=TASK_TYPES[:2])
    assert sorted(find_games(tmp_path / "a")) == sorted(a) and [p.stat().st_mtime_ns for p in a] == mtimes
    c = generate_games(tmp_path / "c", "valid_seen", 2, seed=8, task_types=TASK_TYPES[:2])
    assert [p.read_bytes() for p in c] != [p.read_bytes() for p in a]


def test_generation_dir_keys_every_argument(tmp_path):
    same = generation_dir(tmp_path, "valid_seen", 12, 1, config=GenConfig(max_expert_steps=30))
    assert same == generation_dir(tmp_path, "valid_seen", 12, 1, TASK_TYPES, GenConfig(max_expert_steps=30))
    assert same.parent == tmp_path / "valid_seen" and same.name.startswith("n12-s1-")
    others = [
        generation_dir(tmp_path, "valid_seen", 3, 1, config=GenConfig(max_expert_steps=30)),
        generation_dir(tmp_path, "valid_seen", 12, 2, config=GenConfig(max_expert_steps=30)),
        generation_dir(tmp_path, "valid_seen", 12, 1, config=GenConfig(max_expert_steps=50)),
        generation_dir(tmp_path, "valid_seen", 12, 1, TASK_TYPES[:2], GenConfig(max_expert_steps=30)),
        generation_dir(tmp_path, "valid_unseen", 12, 1, config=GenConfig(max_expert_steps=30)),
    ]
    assert len({same, *others}) == 6


def test_a_failed_generation_leaves_nothing(tmp_path):
    """The expert cannot win in 1 step: no games, no manifest, no temporary directory stay behind."""
    with pytest.raises(GenerationError, match="max_expert_steps=1"):
        generate_games(
            tmp_path / "g",
            "valid_seen",
            1,
            seed=7,
            task_types=TASK_TYPES[:1],
            config=GenConfig(max_expert_steps=1, max_attempts=2),
        )
    assert list(tmp_path.iterdir()) == []


def test_a_concurrent_generation_that_finished_first_is_reused(tmp_path, monkeypatch):
    """Two runs generate the same directory at once: the loser's rename fails, it drops its own
    copy and returns the winner's games; neither rewrites a game the other returned."""
    from singleturn.harness import games as games_mod

    out, generate_into = tmp_path / "g", games_mod._generate_into
    winner = {}

    def race(tmp, *args):
        manifest = generate_into(tmp, *args)
        out.mkdir()
        winner["manifest"] = generate_into(out, *args)  # the other run renames first
        winner["mtimes"] = [p.stat().st_mtime_ns for p in out.rglob("game.tw-pddl")]
        return manifest

    monkeypatch.setattr(games_mod, "_generate_into", race)
    paths = generate_games(out, "valid_seen", 1, seed=7, task_types=TASK_TYPES[:1])
    assert paths == [out / g for g in winner["manifest"]["games"]]
    assert [p.stat().st_mtime_ns for p in out.rglob("game.tw-pddl")] == winner["mtimes"]
    assert [p.name for p in tmp_path.iterdir()] == ["g"], "the loser's temporary copy is left behind"


def test_a_directory_without_a_manifest_is_refused_not_deleted(tmp_path):
    (tmp_path / "g" / "mine").mkdir(parents=True)
    with pytest.raises(GenerationError, match="no manifest.json"):
        generate_games(tmp_path / "g", "valid_seen", 1, seed=7, task_types=TASK_TYPES[:1])
    assert (tmp_path / "g" / "mine").is_dir()


def test_find_games_accepts_official_layout(tmp_path, train_games):
    root = tmp_path / "json_2.1.1"
    for g in train_games[:2]:
        dst = root / "valid_seen" / g.parent.parent.name / g.parent.name
        shutil.copytree(g.parent, dst)
    # ALFWorld's loader rules: no traj_data.json, solvable false, or movable/Sliced dirs are skipped.
    bad = root / "valid_seen" / "pick_and_place_simple-Mug-None-Cabinet-1" / "trial_x"
    shutil.copytree(train_games[0].parent, bad)
    data = json.loads((bad / "game.tw-pddl").read_text())
    data["solvable"] = False
    (bad / "game.tw-pddl").write_text(json.dumps(data))
    shutil.copytree(
        train_games[1].parent, root / "valid_seen" / "pick_and_place_with_movable_recep-A-B-C-1" / "t"
    )
    found = find_games(root, "valid_seen")
    assert [g.parent.parent.name for g in found] == sorted(g.parent.parent.name for g in train_games[:2])
    assert find_games(root / "valid_seen") == found


def test_rejects_unknown_split_and_task_type(tmp_path):
    with pytest.raises(ValueError):
        generate_games(tmp_path, "test", 1, 0)
    with pytest.raises(ValueError):
        generate_games(tmp_path, "train", 1, 0, task_types=["pick_and_place_with_movable_recep"])
