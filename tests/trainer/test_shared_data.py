"""Runs sharing one data.games_dir (issue 23, fault 1): each reads the held-out games generated for
its own settings, and no run deletes, rewrites or half-writes games another run may be reading."""

import os
from pathlib import Path

import pytest

from singleturn.trainer.config import ConfigError, build_config
from singleturn.trainer.prepare import prepare_data

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("ALFWORLD_DATA", str(REPO / "data" / "alfworld"))


def _eval_games(games_dir: Path, eval_games: int, eval_max_steps: int) -> list[Path]:
    """The held-out games a run with these settings prepares (states and tokenizer given: no
    train games, only the eval splits are generated)."""
    for name in ("states.jsonl", "tokenizer.json"):  # given paths must exist; never read here
        (games_dir / name).touch()
    data = build_config(
        {
            "data": {
                "games_dir": str(games_dir),
                "eval_games": eval_games,
                "eval_splits": ["valid_seen"],
                "states_path": str(games_dir / "states.jsonl"),
                "tokenizer_path": str(games_dir / "tokenizer.json"),
            }
        }
    ).data
    art = prepare_data(data, model_path="", need_eval_games=True, eval_max_steps=eval_max_steps)
    return [Path(g) for g in art.eval_games["valid_seen"]]


def _generation(game: Path) -> Path:
    return game.parents[2]  # <generation>/<task folder>/<trial>/game.tw-pddl


def _snapshot(games: list[Path]) -> dict:
    return {g: (g.read_bytes(), g.stat().st_mtime_ns) for g in games}


def test_runs_with_other_eval_settings_keep_each_others_games(tmp_path):
    a = _eval_games(tmp_path, eval_games=2, eval_max_steps=30)  # run A, evaluating
    before = _snapshot(a)
    b = _eval_games(tmp_path, eval_games=1, eval_max_steps=30)  # run B starts with fewer games
    c = _eval_games(tmp_path, eval_games=2, eval_max_steps=40)  # run C with another step limit
    assert len(b) == 1 and len(c) == 2
    assert len({_generation(g) for g in (a[0], b[0], c[0])}) == 3, "one directory per setting"
    assert _snapshot(a) == before, "another run's generation rewrote or deleted run A's games"
    assert _eval_games(tmp_path, eval_games=2, eval_max_steps=30) == a  # A resumes: reused


@pytest.mark.slow
def test_a_generation_the_expert_cannot_win_is_a_config_error_and_deletes_nothing(tmp_path):
    a = _eval_games(tmp_path, eval_games=1, eval_max_steps=30)
    before = _snapshot(a)
    with pytest.raises(ConfigError, match=r"data: game valid_seen/1/0 .*max_expert_steps=1"):
        _eval_games(tmp_path, eval_games=1, eval_max_steps=1)
    assert _snapshot(a) == before
    # The failed generation left nothing behind: no partial games, no manifest, no temporary dir.
    assert [p.name for p in (tmp_path / "valid_seen").iterdir()] == [_generation(a[0]).name]


def test_multiturn_stages_play_their_own_train_generation(tmp_path):
    """Two train generations share games_dir/train: a run plays the one its states came from."""
    from singleturn.harness import generate_games, generation_dir
    from singleturn.trainer.episodes import train_games

    mine = generate_games(generation_dir(tmp_path, "train", 1, 0), "train", 1, 0)
    generate_games(generation_dir(tmp_path, "train", 2, 0), "train", 2, 0)  # another run's
    data = build_config({"data": {"games_dir": str(tmp_path), "train_games": 1, "games_seed": 0}}).data
    assert train_games(data) == [str(g) for g in mine]
