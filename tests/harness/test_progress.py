"""The harness's progress line: a count, a percentage and an ETA, throttled, and always a last line."""

import io

from singleturn.harness import progress as P


def test_progress_counts_throttles_and_ends(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    p = P.Progress("[games] train: generated", 4, every_s=10.0, out=out)
    now[0] += 2.0
    p.update()  # 2 s in: throttled
    now[0] += 10.0
    p.update()  # 12 s in: printed, 6 s each, 2 left
    now[0] += 1.0
    p.update()  # throttled
    now[0] += 1.0
    p.update()  # the last one always prints
    lines = out.getvalue().splitlines()
    assert lines == [
        "[games] train: generated 2/4 (50%) | 6.00 s each, ETA 12s",
        "[games] train: generated 4/4 (100%) | 3.50 s each, 14s in all",
    ]


def test_hms():
    assert (P.hms(5), P.hms(65), P.hms(3725)) == ("5s", "1m05s", "1h02m05s")
