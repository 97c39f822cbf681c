"""bench/bench_vs_trl.py --cpu-smoke (what `make bench` runs): both sides run the same synthetic job.

TRL is an optional extra (`.[trl]`), outside `make test`'s install: the TRL side is skipped without
it, our sides always run. The script writes a random 1-layer checkpoint, its tokenizer and 8 states
(no ALFWorld, no download), and checks that TRL tokenized every prompt to our chat-template ids.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(out: Path, sides: list[str]) -> dict[str, dict]:
    cmd = [
        sys.executable,
        str(REPO / "bench" / "bench_vs_trl.py"),
        "--cpu-smoke",
        "--sides",
        *sides,
        "--out-dir",
        str(out),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "vs_trl.jsonl").read_text().splitlines()]
    assert (out / "vs_trl_cpu-smoke.md").is_file() and [r["side"] for r in rows] == sides
    return {r["side"]: r for r in rows}


@pytest.mark.slow
def test_our_sides_run_the_job(tmp_path):
    by = _run(tmp_path, ["ours", "ours-keep", "ours-padded-keep"])
    for r in by.values():
        assert r["steps"] == 2 and r["s_per_step"] > 0 and 0 < r["rollout_frac"] < 1 and r["peak_rss_mb"] > 0
        assert 0.0 <= r["reward"] <= 1.0 and r["speedup_vs_trl"] is None
    # keep: every sampled sequence (4 states x G 4) is trained; ours only groups with reward variance.
    assert by["ours-keep"]["trained_per_step"] == by["ours-padded-keep"]["trained_per_step"] == 16
    assert by["ours"]["trained_per_step"] <= 16


@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="TRL not installed (optional extra .[trl])"
)
def test_trl_side_runs_the_same_job(tmp_path):
    by = _run(tmp_path, ["trl", "ours"])
    assert by["trl"]["trained_per_step"] == 16 and by["trl"]["steps"] == 2
    assert by["trl"]["speedup_vs_trl"] == pytest.approx(1.0)
    assert by["ours"]["speedup_vs_trl"] == pytest.approx(by["trl"]["s_per_step"] / by["ours"]["s_per_step"])


def test_needs_a_job():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_vs_trl.py")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--model and --states are required" in proc.stderr
