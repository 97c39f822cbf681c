"""One import namespace (issue 21): nothing we ship shadows a dependency, from any working directory.

transformers >= 5.25 imports Hugging Face's `kernels` distribution; our ops used to be a top-level
`kernels` package, which shadowed it from the repository root (transformers failed to load any model)
and was shadowed by it elsewhere (`from kernels import token_logprobs` gave a module). Everything now
lives under `singleturn`; `namespace_probe.py` checks the public ops, transformers' model loading and
where every module came from, in a fresh interpreter started from the root, from another directory and
under torchrun.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("namespace_probe.py")
RUN_PROBE = f"import runpy, sys; sys.argv = ['probe', {str(REPO)!r}]; runpy.run_path({str(PROBE)!r}, run_name='__main__')"


def _env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the installed package (editable) and nothing else, as a user has it
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _check(proc):
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"probe printed no result (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    for line in lines:
        result = json.loads(line)
        assert result["ok"] and proc.returncode == 0, result["failures"] or proc.stderr[-3000:]
    return result


@pytest.mark.parametrize("where", ["root", pytest.param("elsewhere", marks=pytest.mark.slow)])
def test_no_collision_from_any_directory(where, tmp_path):
    # `python -c` puts the working directory on sys.path[0], as `python`, `python -m` and notebooks do.
    cwd = REPO if where == "root" else tmp_path
    proc = subprocess.run(
        [sys.executable, "-c", RUN_PROBE], cwd=cwd, env=_env(), capture_output=True, text=True
    )
    result = _check(proc)
    assert Path(result["singleturn"]).resolve().is_relative_to(REPO)


def test_no_collision_under_torchrun():
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this interpreter")
    cmd = [torchrun, "--standalone", "--nproc_per_node=1", str(PROBE), str(REPO)]
    _check(subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True))


def test_no_root_folder_is_a_package_named_like_a_dependency():
    # A folder with an __init__.py at the root is importable whenever Python starts there.
    for d in REPO.iterdir():
        if d.is_dir() and (d / "__init__.py").exists():
            assert d.name == "singleturn", f"{d.name}/ at the repository root is an importable package"


def test_kernels_exports_functions_not_modules():
    # Importing the submodules must not rebind the package attributes to the modules.
    import singleturn.kernels as K
    import singleturn.kernels.group_advantages
    import singleturn.kernels.grpo_loss
    import singleturn.kernels.sampling
    import singleturn.kernels.token_logprobs  # noqa: F401

    for name in ("token_logprobs", "group_advantages", "grpo_loss", "sample_tokens"):
        assert callable(getattr(K, name)), f"singleturn.kernels.{name} is {getattr(K, name)!r}"
