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


def test_kernels_exports_functions_not_modules():
    # Importing the submodules must not rebind the package attributes to the modules.
    import kernels
    import kernels.group_advantages
    import kernels.grpo_loss
    import kernels.sampling
    import kernels.token_logprobs  # noqa: F401

    for name in ("token_logprobs", "group_advantages", "grpo_loss", "sample_tokens"):
        assert callable(getattr(kernels, name)), f"kernels.{name} is {getattr(kernels, name)!r}"
