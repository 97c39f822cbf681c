"""`model`, `kernels`, `trainer` and `harness` must resolve to this repository.

PyPI has unrelated packages named `kernels` and `trainer`; an install that picked one of them up
would fail in confusing ways far from the cause.
"""

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["model", "kernels", "trainer", "harness"])
def test_package_resolves_inside_repo(name):
    mod = importlib.import_module(name)
    path = Path(mod.__file__).resolve()
    assert path.is_relative_to(REPO), f"{name} imported from {path}, expected under {REPO}"
