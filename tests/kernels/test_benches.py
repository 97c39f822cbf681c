"""The kernel benchmarks run end to end in their CPU smoke mode and write JSONL + markdown.

They run as scripts (bench/ is not a package; each script imports bench/_common.py from its own
directory), in subprocesses, with the torch providers on tiny shapes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("topic", ["token_logprobs", "grpo_loss"])
def test_bench_cpu_smoke(topic, tmp_path):
    script = REPO / "bench" / f"bench_{topic}.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--cpu-smoke", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    rows = [json.loads(line) for line in (tmp_path / f"{topic}.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in rows} >= {"torch-chunked", "torch-naive"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert "error" not in r, f"{r['provider']} {r['mode']}: {r['error']}"
        assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"] and r["tflops"] > 0 and r["git_sha"]
    table = (tmp_path / f"{topic}.md").read_text()
    assert "| provider | mode |" in table and table.count("\n|") >= 1 + len(rows)
