"""Child processes that die with their parent: torchrun workers with their launcher, env workers with
the trainer (or evaluation CLI) that forked them.

A process killed with SIGKILL runs no cleanup, so its children must arrange their own end: an
orphaned torchrun worker trains on, an orphaned env worker keeps whatever it inherited (the run
directory's lock, before `RunDirLock` closed it in forked children) and its CPU. Linux:
`prctl(PR_SET_PDEATHSIG)`, delivered by the kernel at once. Elsewhere (or if prctl fails): a daemon
thread that checks `os.getppid()` every `poll_s` seconds.

PDEATHSIG fires when the parent *thread* that forked the child exits, not the process: fork
children from a thread that lives as long as they should (the main thread here: torchrun forks its
workers from the agent's, `EnvPool` is built on the trainer's).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["exit_when_parent_dies"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_when_parent_dies(sig: int = signal.SIGTERM, poll_s: float = 1.0, parent: int | None = None) -> str:
    """Send this process `sig` when its parent dies (call first thing in the child: once the parent
    is killed, even by SIGKILL, the child stops instead of running on as an orphan).

    parent: the pid the child expects as its parent (the forking process passes os.getpid()); when
    it is already gone by the time this runs, `sig` is sent at once. Default: the current parent.
    Returns the mechanism used: "prctl" or "poll".
    """
    parent = os.getppid() if parent is None else parent
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols include libc's
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), sig)
            return "prctl"
    _watch_parent(parent, sig, poll_s)
    return "poll"


def _watch_parent(parent: int, sig: int, poll_s: float) -> threading.Thread:
    """The portable fallback: a daemon thread that sends `sig` to this process once it has been
    re-parented (its parent, `parent`, died)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), sig)

    t = threading.Thread(target=watch, name="exit-when-parent-dies", daemon=True)
    t.start()
    return t
