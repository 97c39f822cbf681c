"""Run-directory guards (trainer/run_dir.py): the lock, the parent-death watchdog, the resume config
check and the fresh-run guard, each tested by injecting the fault it guards against."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from trainer.config import build_config
from trainer.run_dir import (
    RunDirError,
    RunDirLock,
    check_resume_config,
    config_diff,
    guard_fresh_run,
    open_run_dir,
    trajectory_settings,
)


def _python(code: str, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=60, **kw)  # fmt: skip


# --- RunDirLock


def test_second_process_on_a_locked_run_dir_is_refused(tmp_path):
    with RunDirLock(tmp_path / "run") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname(), holder
        proc = _python(
            """
            import sys
            from trainer.run_dir import RunDirError, RunDirLock
            try:
                RunDirLock(sys.argv[1]).acquire()
            except RunDirError as e:
                print(e)
                sys.exit(3)
            """,
            str(tmp_path / "run"),
        )
        assert proc.returncode == 3, f"the second process got the lock:\n{proc.stdout}{proc.stderr}"
        assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in proc.stdout, proc.stdout
        # flock belongs to the open file description: a second open in this process is refused too
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            RunDirLock(tmp_path / "run").acquire()
    RunDirLock(tmp_path / "run").acquire().release()  # released: free again


def test_stale_lock_of_a_dead_process_is_retaken(tmp_path, caplog):
    proc = _python(
        """
        import os, sys
        from trainer.run_dir import RunDirLock
        RunDirLock(sys.argv[1]).acquire()
        print(os.getpid())
        os._exit(0)  # dies holding the lock: no release, the lock file stays with its pid
        """,
        str(tmp_path / "run"),
    )
    assert proc.returncode == 0, proc.stderr
    dead = int(proc.stdout)
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == dead
    with caplog.at_level("WARNING", logger="trainer.run_dir"), RunDirLock(tmp_path / "run") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"stale lock; its holder, pid {dead}" in caplog.text, caplog.text


# --- exit_when_parent_dies

_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])  # inherits our stdout
print(child.pid, flush=True)
time.sleep(120)
"""

_CHILD = """
import sys, time
from trainer.run_dir import {fn}
{call}
print("ready", flush=True)
time.sleep(120)  # an orphaned worker that would keep training
"""


@pytest.mark.parametrize(
    "fn, call",
    [
        ("exit_when_parent_dies", "assert exit_when_parent_dies() == 'prctl'"),
        ("_watch_parent", "import os, signal; _watch_parent(os.getppid(), signal.SIGTERM, 0.05)"),
    ],
    ids=["prctl", "poll"],
)
def test_worker_exits_when_its_launcher_is_killed(fn, call):
    """A parent (the torchrun agent) starts a child (the worker) and is SIGKILLed; the child must
    die too. The child holds the stdout pipe, so EOF on it means the child is gone."""
    child_code = _CHILD.format(fn=fn, call=call)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, child_code], stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "ready"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready, _, _ = select.select([parent.stdout], [], [], deadline - time.monotonic())
            if ready and parent.stdout.read() == "":  # EOF: every writer (the child) has exited
                child_pid = None
                break
        assert child_pid is None, f"the child {child_pid} outlived its killed parent by 20 s"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child_pid is not None:
            os.kill(child_pid, signal.SIGKILL)


# --- config_diff, the resume hash, check_resume_config


def test_config_diff_names_each_key_with_both_values():
    old = build_config({}).to_dict()
    new = build_config({"optim": {"lr": 0.002}, "run": {"stages": ["sft"]}}).to_dict()
    assert config_diff(old, new) == ["optim.lr: 0.001 -> 0.002", 'run.stages: ["sft", "grpo"] -> ["sft"]']
    assert config_diff({"a": {"x": 1}}, {"a": {}}) == ["a.x: 1 -> <absent>"]
    assert config_diff(old, old) == []


@pytest.mark.parametrize(
    "change, same",
    [
        ({"checkpoint": {"keep_last": 1}}, True),
        ({"checkpoint": {"every": 7, "export_final": False, "resume": True}}, True),
        ({"eval": {"every": 5, "num_workers": 7, "decoding": "rank"}}, True),
        ({"run": {"plots": False, "num_threads": 3, "log_every": 9, "stop_after_step": 2}}, True),
        ({"run": {"name": "moved", "out_dir": "elsewhere"}}, True),
        ({"optim": {"lr": 0.002}}, False),
        ({"rollout": {"temperature": 0.7}}, False),
        ({"run": {"seed": 1}}, False),
    ],
)
def test_resume_hash_covers_only_trajectory_settings(change, same):
    a, b = build_config({}), build_config(change)
    assert (a.hash() == b.hash()) == same, f"{change}: hash {'changed' if same else 'unchanged'}"
    assert (trajectory_settings(a.to_dict()) == trajectory_settings(b.to_dict())) == same


def _run_dir_with_config(tmp_path, **sections):
    cfg = build_config({"run": {"out_dir": str(tmp_path), "name": "r"}, **sections})
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return cfg


def test_resume_with_other_training_settings_is_refused_before_writing(tmp_path):
    saved = _run_dir_with_config(tmp_path)
    before = (saved.run_dir / "config.json").read_bytes()
    new = build_config({"run": {"out_dir": str(tmp_path), "name": "r"}, "optim": {"lr": 0.002},
                        "rollout": {"temperature": 0.5}, "checkpoint": {"keep_last": 1, "resume": True}})  # fmt: skip
    with pytest.raises(RunDirError) as err:
        check_resume_config(saved.run_dir, new)
    msg = str(err.value)
    assert "optim.lr: 0.001 -> 0.002" in msg and "rollout.temperature: 1.0 -> 0.5" in msg, msg
    assert "keep_last" not in msg, msg
    with pytest.raises(RunDirError, match=r"optim\.lr: 0\.001 -> 0\.002"):
        open_run_dir(new)  # the integrated path: lock, check, then (never reached) config.json
    assert (saved.run_dir / "config.json").read_bytes() == before
    RunDirLock(saved.run_dir).acquire().release()  # the refused resume released its lock


def test_resume_with_a_lower_keep_last_is_allowed_and_reported(tmp_path):
    saved = _run_dir_with_config(tmp_path)
    new = build_config({"run": {"out_dir": str(tmp_path), "name": "r"},
                        "checkpoint": {"keep_last": 1, "resume": True}})  # fmt: skip
    assert check_resume_config(saved.run_dir, new) == [
        "checkpoint.keep_last: 3 -> 1",
        "checkpoint.resume: false -> true",
    ]
    lock = open_run_dir(new)
    try:
        assert json.loads((saved.run_dir / "config.json").read_text())["checkpoint"]["keep_last"] == 1
    finally:
        lock.release()


# --- guard_fresh_run


def _used_run_dir(tmp_path):
    d = tmp_path / "r"
    (d / "checkpoints" / "step_3").mkdir(parents=True)
    (d / "eval").mkdir()
    (d / "eval" / "sft.json").write_text("{}")
    (d / "final").mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    (d / "config.json").write_text("{}")
    return d


def test_fresh_run_in_a_used_run_dir_is_refused(tmp_path):
    d = _used_run_dir(tmp_path)
    with pytest.raises(RunDirError) as err:
        guard_fresh_run(d, resume=False, overwrite=False)
    msg = str(err.value)
    assert "checkpoints, final, eval, metrics.jsonl" in msg, msg
    assert "--resume" in msg and "run.name" in msg and "--overwrite" in msg, msg
    assert (d / "checkpoints" / "step_3").is_dir() and (d / "metrics.jsonl").is_file()
    assert guard_fresh_run(d, resume=True, overwrite=False) == []  # a resume continues it
    cfg = build_config({"run": {"out_dir": str(tmp_path), "name": "r"}, "optim": {"lr": 0.5}})
    with pytest.raises(RunDirError, match="already holds a run"):
        open_run_dir(cfg)
    assert (d / "config.json").read_text() == "{}", "the refused run overwrote config.json"


def test_overwrite_removes_the_earlier_run(tmp_path):
    d = _used_run_dir(tmp_path)
    removed = guard_fresh_run(d, resume=False, overwrite=True)
    assert removed == ["checkpoints", "final", "eval", "metrics.jsonl"]
    assert sorted(p.name for p in d.iterdir()) == ["config.json"]
    assert guard_fresh_run(d, resume=False, overwrite=False) == []  # now a fresh directory
    (d / "checkpoints").mkdir()  # an empty checkpoints/ is no earlier run
    assert guard_fresh_run(d, resume=False, overwrite=False) == []
    with pytest.raises(RunDirError, match="contradict"):
        guard_fresh_run(d, resume=True, overwrite=True)
