"""Run-directory guards (trainer/run_dir.py): the lock, the parent-death watchdog, the resume config
check and the fresh-run guard, each tested by injecting the fault it guards against."""

import json
import multiprocessing
import os
import select
import signal
import socket
import time

import pytest

from singleturn.harness.parent_death import _watch_parent
from singleturn.trainer.config import build_config
from singleturn.trainer.run_dir import (
    RunDirError,
    RunDirLock,
    check_resume_config,
    config_diff,
    exit_when_parent_dies,
    guard_fresh_run,
    open_run_dir,
    trajectory_settings,
    write_run_config,
)


def _forked(fn, *args, timeout: float = 30.0):
    """fn(*args) in a forked child process (a second process with its own open file descriptions
    that starts in milliseconds: the modules are already imported); returns what it sent back."""
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=fn, args=(theirs, *args))
    proc.start()
    try:
        assert mine.poll(timeout), f"{fn.__name__} sent nothing within {timeout} s"
        return mine.recv()
    finally:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()


def _try_lock(conn, run_dir):
    try:
        RunDirLock(run_dir).acquire()
        conn.send("acquired")
    except RunDirError as e:
        conn.send(f"refused: {e}")


def _lock_and_die(conn, run_dir):
    RunDirLock(run_dir).acquire()
    conn.send(os.getpid())
    os._exit(0)  # dies holding the lock: no release, the lock file keeps its pid


# --- RunDirLock


def test_second_process_on_a_locked_run_dir_is_refused(tmp_path):
    with RunDirLock(tmp_path / "run") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname(), holder
        got = _forked(_try_lock, tmp_path / "run")
        assert got.startswith("refused: "), f"the second process got the lock: {got}"
        assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in got, got
        # flock belongs to the open file description: a second open in this process is refused too
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            RunDirLock(tmp_path / "run").acquire()
    assert _forked(_try_lock, tmp_path / "run") == "acquired"  # released: free again


def test_stale_lock_of_a_dead_process_is_retaken(tmp_path, caplog):
    dead = _forked(_lock_and_die, tmp_path / "run")
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == dead
    with (
        caplog.at_level("WARNING", logger="singleturn.trainer.run_dir"),
        RunDirLock(tmp_path / "run") as lock,
    ):
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"stale lock; its holder, pid {dead}" in caplog.text, caplog.text


# --- exit_when_parent_dies


def _launcher_and_worker(w: int, use_prctl: bool) -> None:
    """Runs in a forked 'launcher': forks a 'worker' that arms the watchdog, then both sleep. Both
    hold the pipe's write end `w`; never returns (os._exit)."""
    try:
        worker = os.fork()
        if worker == 0:
            try:
                if use_prctl:
                    assert exit_when_parent_dies() == "prctl"
                else:
                    _watch_parent(os.getppid(), signal.SIGTERM, 0.05)
                os.write(w, b"ready\n")
                time.sleep(60)  # an orphaned worker would train on here
            finally:
                os._exit(0)
        os.write(w, f"{worker}\n".encode())
        time.sleep(60)
    finally:
        os._exit(0)


@pytest.mark.parametrize("use_prctl", [True, False], ids=["prctl", "poll"])
def test_worker_exits_when_its_launcher_is_killed(use_prctl):
    """A launcher (torchrun's agent) starts a worker and is SIGKILLed: the worker must die too.
    Both hold the write end of a pipe, so EOF on its read end means the worker is gone."""
    r, w = os.pipe()
    launcher = os.fork()
    if launcher == 0:
        os.close(r)
        _launcher_and_worker(w, use_prctl)
    os.close(w)
    worker = None
    with os.fdopen(r) as out:
        try:
            # The launcher's pid line and the worker's "ready" race for the pipe: take them in any order.
            lines = sorted([out.readline(), out.readline()])  # digits sort before "ready"
            assert lines[1] == "ready\n", lines
            worker = int(lines[0])
            os.kill(launcher, signal.SIGKILL)
            os.waitpid(launcher, 0)
            ready, _, _ = select.select([out], [], [], 20)
            assert ready and out.read() == "", f"worker {worker} outlived its killed launcher by 20 s"
            worker = None  # EOF: it is gone
        finally:
            if worker is not None:
                os.kill(worker, signal.SIGKILL)
            try:
                os.kill(launcher, signal.SIGKILL)
                os.waitpid(launcher, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


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
    new = build_config(
        {
            "run": {"out_dir": str(tmp_path), "name": "r"},
            "optim": {"lr": 0.002},
            "rollout": {"temperature": 0.5},
            "checkpoint": {"keep_last": 1, "resume": True},
        }
    )
    with pytest.raises(RunDirError) as err:
        check_resume_config(saved.run_dir, new)
    msg = str(err.value)
    assert "optim.lr: 0.001 -> 0.002" in msg and "rollout.temperature: 1.0 -> 0.5" in msg, msg
    assert "keep_last" not in msg, msg
    with pytest.raises(RunDirError, match=r"optim\.lr: 0\.001 -> 0\.002"):
        open_run_dir(new)  # the integrated path: lock, check, then (never reached) config.json
    assert (saved.run_dir / "config.json").read_bytes() == before
    RunDirLock(saved.run_dir).acquire().release()  # the refused resume released its lock


def test_a_key_added_in_a_later_version_blocks_resume_only_off_its_default(tmp_path):
    """A run saved before a config key existed resumes when the new key is at its default (the new
    code then behaves as the old one did); set off its default, the key blocks as any change."""
    saved = _run_dir_with_config(tmp_path)
    old = json.loads((saved.run_dir / "config.json").read_text())
    del old["dagger"], old["grpo"]["max_tokens_per_micro_batch"]  # as a file written before they existed
    (saved.run_dir / "config.json").write_text(json.dumps(old))
    same = build_config({"run": {"out_dir": str(tmp_path), "name": "r"}})
    lines = check_resume_config(saved.run_dir, same)  # not refused; the added keys are reported
    assert (
        "dagger.every: <absent> -> 4" in lines
        and "grpo.max_tokens_per_micro_batch: <absent> -> 8192" in lines
    )
    off = build_config({"run": {"out_dir": str(tmp_path), "name": "r"}, "dagger": {"every": 2}})
    with pytest.raises(RunDirError, match=r"dagger\.every: <absent> -> 2"):
        check_resume_config(saved.run_dir, off)


def test_resume_hash_leaves_out_default_settings():
    import hashlib

    cfg = build_config({"optim": {"lr": 0.002}})
    # Only non-default settings are hashed: a key added later at its default changes nothing.
    want = hashlib.sha256(json.dumps({"optim.lr": 0.002}, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.hash() == want
    assert build_config({"dagger": {"every": 2}}).hash() != build_config({}).hash()


def test_resume_with_a_lower_keep_last_is_allowed_and_reported(tmp_path):
    saved = _run_dir_with_config(tmp_path)
    new = build_config(
        {"run": {"out_dir": str(tmp_path), "name": "r"}, "checkpoint": {"keep_last": 1, "resume": True}}
    )
    assert check_resume_config(saved.run_dir, new) == [
        "checkpoint.keep_last: 3 -> 1",
        "checkpoint.resume: false -> true",
    ]
    lock = open_run_dir(new)
    try:  # open_run_dir writes nothing; config.json comes once every check passed (the checkpoint's)
        assert json.loads((saved.run_dir / "config.json").read_text())["checkpoint"]["keep_last"] == 3
        write_run_config(new)
        assert json.loads((saved.run_dir / "config.json").read_text())["checkpoint"]["keep_last"] == 1
        assert sorted(p.name for p in saved.run_dir.iterdir()) == [".lock", "config.json"]
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
