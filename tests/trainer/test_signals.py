"""SIGTERM and SIGINT save a checkpoint at the next step boundary and exit with a documented code
(issue 23, fault 9): 143 for SIGTERM, 130 for SIGINT (trainer/signals.py).

`torchrun trainer/main.py` on the tiny synthetic setup of test_resume.py, with an SFT stage far longer
than the test: once the first step is in metrics.jsonl, a signal goes to one of 2 workers alone (a
scheduler signalling one training process: the ranks must agree on the step to stop at), to the whole process group (Ctrl-C, SLURM: torchrun
forwards it, so the worker gets it twice), or to a plain `python trainer/main.py` (world size 1),
whose exit code is the worker's. The run must stop after the step it was in, with a
checkpoint of exactly that step, and `--resume` must continue from there.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume import REPO, TORCHRUN, run_torchrun, tiny_args

from singleturn.trainer.checkpoint import verify_checkpoint
from singleturn.trainer.signals import StopSignals
from singleturn.trainer.synthetic import write_synthetic_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    return (root, *write_synthetic_inputs(root))


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]  # skip a torn last line
    return [r["step"] for r in rows if r["kind"] == "sft"]


def _one_worker_pid(launcher: int) -> int:
    """The pid of one of torchrun's 2 workers (either rank: the other must stop at the same step)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    assert len(children) == 2, f"torchrun's children: {children}"
    return int(children[-1])


@pytest.mark.parametrize(
    "sig, target",
    [  # one in `make test`; the other two targets take ~40 s each (make test-all)
        pytest.param(signal.SIGTERM, "worker", marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, "group", marks=pytest.mark.slow),
        (signal.SIGTERM, "python"),
    ],
)
def test_signal_saves_the_step_it_stopped_at_and_resume_continues(inputs, sig, target):
    root, states, tok = inputs
    name = f"{sig.name}-{target}"
    args = tiny_args(root, states, tok, name) + ["--sft.steps=100000"]  # runs until signalled
    run_dir = root / "runs" / name
    nproc = 2 if target == "worker" else 1
    torchrun = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"]
    launcher = [sys.executable] if target == "python" else torchrun
    cmd = [*launcher, str(REPO / "trainer/main.py"), *args]
    with open(root / f"{name}.out", "w+") as out, open(root / f"{name}.err", "w+") as err:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while not _steps(run_dir) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # polls a file another process writes: not a sleep standing in for sync
            assert _steps(run_dir), (
                f"no step logged (exit {proc.poll()}):\n{(root / f'{name}.err').read_text()}"
            )
            if target == "worker":
                os.kill(_one_worker_pid(proc.pid), sig)
            elif target == "python":  # no torchrun: world size 1, the process is the worker
                os.kill(proc.pid, sig)
            else:
                os.killpg(proc.pid, sig)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        err.seek(0)
        stderr = err.read()
    steps = _steps(run_dir)
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 100000, steps[-5:]
    if target == "python":  # without torchrun the process's own exit code is the documented one
        assert proc.returncode == 128 + sig, f"exit {proc.returncode}:\n{stderr[-3000:]}"
    else:
        assert proc.returncode != 0, "torchrun exits non-zero (1) when its worker stops on a signal"
    assert (
        f"stopped: {sig.name} after step {last}: saved {run_dir / 'checkpoints' / f'step_{last}'}" in stderr
    ), stderr[-3000:]
    if target == "worker":  # torchrun's failure summary carries the worker's exit code
        assert f"exitcode  : {128 + sig}" in stderr, stderr[-3000:]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == [f"step_{last}"], f"{ckpts}: expected the step it stopped at, complete"
    assert verify_checkpoint(run_dir / "checkpoints" / f"step_{last}") is None
    shards = sorted(p.name for p in (run_dir / "checkpoints" / f"step_{last}").glob("shard_rank*"))
    assert len(shards) == nproc, f"{shards}: every rank saved the same step"

    resumed = run_torchrun(
        tiny_args(root, states, tok, name)
        + ["--sft.steps=100000", "--resume", f"--run.stop_after_step={last + 1}"],
        nproc=nproc,
    )
    assert f"continuing after step {last}" in resumed.stdout, resumed.stdout[-2000:]
    assert _steps(run_dir) == list(range(1, last + 2))


def test_repeated_signals_are_absorbed_and_the_handlers_restored():
    """torchrun forwards what its process group got: the second signal must not kill the save."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM, "the first signal decides the exit code"
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("sig, want", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 7)])
def test_forked_children_act_as_before(sig, want):
    """An env worker forked during training dies on SIGTERM and gets KeyboardInterrupt on SIGINT
    (exit 7 below), as it did before the trainer installed its handlers. Python's own handlers are
    set first: a shell that starts pytest in the background hands it SIGINT ignored."""
    saved = {
        s: signal.signal(s, h)
        for s, h in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler))
    }
    try:
        _forked_child_exit(sig, want)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _forked_child_exit(sig, want):
    with StopSignals() as stop:
        pid = os.fork()
        if pid == 0:  # the child: exits 0 only if the signal was swallowed
            try:
                os.kill(os.getpid(), sig)
            except KeyboardInterrupt:
                os._exit(7)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == want, f"child exit {os.waitstatus_to_exitcode(status)}"
    assert stop.signum == 0, "the child's signal reached the parent's flag"
