"""A progress line with a count and an ETA for the harness's long phases (torch-free).

`Progress("[data] train games", total)` prints `[data] train games 120/300 (40%) | 0.52 s each, ETA
1m34s` at most every `every_s` seconds and once at the end, to stderr (diagnostics: a CLI's stdout
stays its output). A phase of a few seconds prints only its last line.
"""

from __future__ import annotations

import sys
import time


def hms(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    def __init__(self, label: str, total: int, *, every_s: float = 15.0, enabled: bool = True, out=None):
        self.label, self.total, self.every_s, self.enabled = label, total, every_s, enabled
        self.out = out or sys.stderr  # diagnostics: stdout stays the CLI's output
        self.done = 0
        self.t0 = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.every_s or self.done >= self.total):
            self._last = now
            print(self.line(now), file=self.out, flush=True)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        per = (now - self.t0) / max(self.done, 1)
        pct = 100.0 * self.done / max(self.total, 1)
        tail = (
            f"ETA {hms(per * (self.total - self.done))}"
            if self.done < self.total
            else f"{hms(now - self.t0)} in all"
        )
        return f"{self.label} {self.done}/{self.total} ({pct:.0f}%) | {per:.2f} s each, {tail}"
