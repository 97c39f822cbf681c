"""Shared fixtures: a small set of generated games (one per task type) for train and valid_unseen.

ALFWORLD_DATA points at the repository's ignored data/ folder (importing alfworld creates it, and the
harness keeps its translation cache there), set before any harness module is imported.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("ALFWORLD_DATA", str(REPO / "data" / "alfworld"))


@pytest.fixture(scope="session")
def train_games(tmp_path_factory):
    """One expert-checked train game per task type (seed 0), in TASK_TYPES order."""
    from singleturn.harness import generate_games

    return generate_games(tmp_path_factory.mktemp("games") / "train", "train", 6, seed=0, num_workers=2)


@pytest.fixture(scope="session")
def unseen_games(tmp_path_factory):
    from singleturn.harness import generate_games

    return generate_games(
        tmp_path_factory.mktemp("games") / "valid_unseen", "valid_unseen", 6, seed=0, num_workers=2
    )
