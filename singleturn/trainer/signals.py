"""SIGTERM and SIGINT stop the run at the next step boundary, with a checkpoint of that step.

Schedulers (SLURM, Kubernetes) send SIGTERM some time before they kill; Ctrl-C sends SIGINT to the
whole foreground process group. While `Trainer.train` runs (`with StopSignals() as stop:`), either
signal only sets a flag (a handler may run between any two bytecodes: it touches nothing else). At
each step boundary every rank all-reduces its flag (`stop.requested()`: the max of the signal
numbers, so all ranks stop after the same step even when only one was signalled), the run saves a
checkpoint of that step and raises `Interrupted`, and `trainer/main.py` prints one line and exits
128 + the signal number: 143 for SIGTERM, 130 for SIGINT (the shell's convention for a death by
that signal). A signal during an evaluation takes effect after it (before the next evaluation or at
the next step boundary).

Further signals are ignored until then: torchrun forwards the signal it gets to its workers, so a
worker signalled together with its launcher (a process group: Ctrl-C, SLURM) gets it twice. SIGKILL
stops at once and loses nothing saved: a checkpoint being written is under `.tmp_step_N`, never
loaded, deleted by the next save. After forwarding a signal torchrun waits `--shutdown_timeout`
seconds (30 by default) for its workers, then kills them: raise it when a step plus a save take
longer. In processes forked from the trainer (env workers), the handlers do what the ones they
replaced did (SIGINT: KeyboardInterrupt; SIGTERM: die), so those processes stop as before.
"""

from __future__ import annotations

import os
import signal
import threading

from singleturn.trainer.dist import all_reduce_max

__all__ = ["Interrupted", "StopSignals"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped on a signal at a step boundary; `code` is the process exit code (128 + signum)."""

    def __init__(self, signum: int, message: str):
        super().__init__(f"{signal.Signals(signum).name} {message}; continue with --resume")
        self.code = 128 + signum


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGINT set a flag that `requested()` reads at step
    boundaries. Outside the main thread (signals cannot be handled there) it installs nothing."""

    def __init__(self):
        self.signum = 0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def requested(self) -> int:
        """The signal number any rank received (0: none). Collective: every rank calls it at the same
        step boundary (one int all-reduce and host sync per step, tiny next to a step)."""
        return all_reduce_max(self.signum)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked child (an env worker): what it did before the trainer
            self._previous_action(signum, frame)
            return
        if self.signum:
            return  # the stop is already on its way (torchrun forwards what its process group got)
        self.signum = signum
        if os.environ.get("LOCAL_RANK", "0") == "0":  # os.write: print() is not safe in a handler
            name = signal.Signals(signum).name
            os.write(2, f"[run] {name}: stopping after this step, with a checkpoint\n".encode())

    def _previous_action(self, signum: int, frame) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
