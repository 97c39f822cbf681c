"""Guards of the run directory: one writer at a time, no mixing of two runs, resume only with the
same training settings, and no orphaned torchrun worker training on after its launcher died.

What each guard prevents:
- `RunDirLock`: two processes training into one `runs/<name>/` (an orphaned worker and a new
  `--resume` interleaving metrics.jsonl and both writing step_N/ and final/). An exclusive
  `fcntl.flock` on `run_dir/.lock`, held while the process lives (the kernel drops it when the
  process dies, however it dies), the file naming the holder (pid, host, start time). A lock file
  left by a dead process is not held by anyone and is simply re-taken (with a warning naming the
  previous holder). flock works across processes of one host and, on Linux NFS (v4, or v3 with
  lockd), across hosts; on filesystems without lock support the lock only guards one host.
- `exit_when_parent_dies` (harness/parent_death.py): killing torchrun (its agent) must not leave a
  worker training: on Linux `prctl(PR_SET_PDEATHSIG, SIGTERM)`, elsewhere a daemon thread polling
  `os.getppid()`. Env workers use the same call (SIGKILL) to die with the trainer.
- Forked children never hold the lock: `fork` duplicates the lock's file descriptor, and a child
  that outlived a killed trainer (an env worker, a generation process) would keep the run locked
  by a dead pid; a fork hook closes the descriptor in every child (the parent keeps the lock).
- `check_resume_config`: `--resume` with settings that change the trajectory (the resumed run would
  be neither the old run nor a new one). Compared key by key against the saved config.json, before
  anything is written, the error lists every differing key with both values.
- `guard_fresh_run`: a fresh run (no --resume) in a directory holding an earlier run's
  checkpoints/final/eval/metrics, which it would silently mix with or delete.

Which settings may change on resume (`RESUME_FREE_KEYS`, i.e. out of `TrainConfig.hash()`) and
why: trainer/config/resume_keys.py.

Run start, in this order:
    if "LOCAL_RANK" in os.environ:      # trainer/main.py, first thing: a torchrun worker (not a
        exit_when_parent_dies()         # plain `python`, whose parent is a shell or nohup)
    lock = open_run_dir(cfg)            # Trainer start (trainer/train.py), every rank (collective),
                                        # before anything writes into run_dir: lock, then
                                        # guard_fresh_run and, with --resume, check_resume_config;
                                        # RunDirError (a ConfigError) on every rank
    ...data, model, the checkpoint (its config hash: the last check that can refuse a resume)...
    write_run_config(cfg)               # config.json, only now: a refused run changes nothing
    ...train...; if lock: lock.release()   # optional: process exit releases it too
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from singleturn.harness.atomic import write_text_atomic
from singleturn.harness.parent_death import exit_when_parent_dies
from singleturn.trainer.config.resume_keys import RESUME_FREE_KEYS, flatten, trajectory_settings
from singleturn.trainer.dist import broadcast_object, is_main
from singleturn.trainer.errors import ConfigError

__all__ = [
    "RESUME_FREE_KEYS",
    "RUN_ARTIFACTS",
    "RunDirError",
    "RunDirLock",
    "check_resume_config",
    "config_diff",
    "exit_when_parent_dies",
    "guard_fresh_run",
    "open_run_dir",
    "trajectory_settings",
    "write_run_config",
]

log = logging.getLogger(__name__)  # warnings print even when logging is not configured

RUN_ARTIFACTS = ("checkpoints", "final", "sft_model", "eval", "metrics.jsonl", "plots", "timings.json")
"""What a run writes into its directory besides config.json and .lock; `--overwrite` removes these."""


class RunDirError(ConfigError):
    """The run directory cannot be used as asked: locked by another process, holding an earlier
    run, or resumed with other settings. A ConfigError: the entry point prints one line, exits 2."""


_ABSENT = "<absent>"


def config_diff(old: dict, new: dict) -> list[str]:
    """'section.key: old -> new' for every key whose value differs (values as JSON; a key missing
    on one side shows as <absent>), sorted by key. Takes nested or flat config dicts."""
    a, b = flatten(old), flatten(new)
    lines = []
    for k in sorted(a.keys() | b.keys()):
        va, vb = a.get(k, _ABSENT), b.get(k, _ABSENT)
        if va != vb:
            show = [v if v is _ABSENT else json.dumps(v) for v in (va, vb)]
            lines.append(f"{k}: {show[0]} -> {show[1]}")
    return lines


def _as_json(cfg) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists: compares like the saved file


def check_resume_config(run_dir, cfg) -> list[str]:
    """Compare `cfg` with `run_dir/config.json` before a resume writes anything. Raises RunDirError
    listing every trajectory setting that differs (both values); returns the config_diff lines of
    the allowed changes (RESUME_FREE_KEYS) for the caller to log. No config.json: nothing to
    compare, returns [] (the checkpoint's own config hash is still checked when it loads)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise RunDirError(
            f"--resume: {path} is unreadable ({e}); restore it or start a new run.name"
        ) from None
    new = _as_json(cfg)
    # A key the saved config lacks (added in a later version) blocks only when it is not at its default.
    defaults, new_flat, saved_flat = flatten(_as_json(type(cfg)())), flatten(new), flatten(saved)
    saved_flat.update({k: v for k, v in defaults.items() if k not in saved_flat and new_flat.get(k) == v})
    blocking = config_diff(trajectory_settings(saved_flat), trajectory_settings(new))
    if blocking:
        raise RunDirError(
            f"--resume: {run_dir} was trained with other settings that change the training trajectory: "
            + "; ".join(blocking)
            + f". Resume with the saved values ({path}) or start a new run.name"
        )
    return config_diff(saved, new)


def guard_fresh_run(run_dir, *, resume: bool, overwrite: bool) -> list[str]:
    """A fresh run (resume False) must not start in a directory holding an earlier run's outputs
    (RUN_ARTIFACTS; an empty checkpoints/ does not count): RunDirError telling to pass --resume, a
    new run.name, or --overwrite. With overwrite those outputs are deleted first. Returns the names
    removed. Call before anything writes into run_dir (rank 0)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: continue the run, or delete it")
    if resume:
        return []
    found = []
    for name in RUN_ARTIFACTS:
        p = run_dir / name
        if p.is_dir() and name == "checkpoints" and not any(p.iterdir()):
            continue
        if p.exists():
            found.append(name)
    if found and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(found)}): pass --resume to continue it, set a new "
            f"run.name, or pass --overwrite to delete {', '.join(found)} and start over"
        )
    for name in found:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return found


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"


class RunDirLock:
    """Exclusive lock on `run_dir/.lock` (fcntl.flock), held until `release()` or process exit.

    `acquire()` creates run_dir if needed, raises RunDirError naming the holder when another process
    holds the lock, and re-takes (with a warning) a lock file whose process is gone. flock belongs
    to the open file description, which a forked child would share (keeping the lock while it
    lives): a fork hook closes the child's copy (`_close_in_child`; closing does not unlock, the
    parent's copy still holds it). A second `open` of the file, in this process or another, does
    not share it. The descriptor is also close-on-exec (os.open's default).
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"run directory {self.run_dir} is in use by {_describe(holder)}: another process is "
                f"training into it. Stop that process, or set another run.name"
            ) from None
        previous = _read_holder(fd)
        if previous:
            log.warning(f"{self.path}: re-taking a stale lock; its holder, {_describe(previous)}, is gone")
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        _HELD.add(self)
        return self

    def release(self) -> None:
        """Unlock (the file stays: deleting it would let a third process lock a fresh inode while a
        second one still waits on the old one)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        _HELD.discard(self)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: set[RunDirLock] = set()  # the locks this process holds (held until released or exit)


def _close_in_child() -> None:
    """After fork, in the child: close its copies of the held lock descriptors (never LOCK_UN,
    which would unlock the parent's too) and forget them, so the child neither holds nor releases."""
    for lock in list(_HELD):
        if lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except ValueError:  # empty or half-written by a holder that died mid-write
        return {}


def open_run_dir(cfg) -> RunDirLock | None:
    """Take the run directory for `cfg` (collective: every rank calls it; rank 0 does the work):
    lock it, then with --resume check_resume_config (allowed changes printed), else
    guard_fresh_run(overwrite=cfg.checkpoint.overwrite). Writes nothing but the lock (and what
    --overwrite removes): config.json waits for `write_run_config`, after every check that can
    refuse the run. Raises RunDirError with rank 0's message on every rank; returns the held lock
    on rank 0, None on the others."""
    lock, error = None, None
    if is_main():
        run_dir = cfg.run_dir
        try:
            lock = RunDirLock(run_dir).acquire()
            resume, overwrite = cfg.checkpoint.resume, cfg.checkpoint.overwrite
            for name in guard_fresh_run(run_dir, resume=resume, overwrite=overwrite):
                print(f"[run] --overwrite: removed {run_dir / name}", flush=True)
            if resume:
                for line in check_resume_config(run_dir, cfg):
                    print(f"[resume] allowed change: {line}", flush=True)
        except (ConfigError, OSError) as e:  # OSError: e.g. run.out_dir not writable
            error = str(e)
            if lock is not None:
                lock.release()
    error = broadcast_object(error)
    if error is not None:
        raise RunDirError(error)
    return lock


def write_run_config(cfg) -> Path:
    """Write `run_dir/config.json` (rank 0 calls it; atomic: a temporary file renamed into place).
    Call once every check that can refuse the run has passed (for a resume, the checkpoint's own
    config hash): a refused `--resume` must leave the saved settings as they were, or the run could
    never resume with them again."""
    return write_text_atomic(Path(cfg.run_dir) / "config.json", json.dumps(cfg.to_dict(), indent=2))
