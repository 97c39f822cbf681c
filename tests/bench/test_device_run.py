"""bench/device_run.sh's CPU rehearsal in a reduced form, so the device script cannot rot between GPU runs.

The full rehearsal (every part, in a bare venv holding only what the device image has) is
`PY=/path/to/bare/python bash bench/device_run.sh OUT --cpu-dry-run` (bench/results/README.md); here:
the preflight, three parts end to end on the CPU (the torchrun hand-FSDP smoke, the ceilings, the
sampler) with their GPU command lines parsed, the packing limits, and that every part's GPU flags parse.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# bench/ is not a package: load the script as a module by path (no sys.path edit for the whole session)
_spec = importlib.util.spec_from_file_location("device_run", REPO / "bench" / "device_run.py")
device_run = sys.modules.setdefault(
    "device_run", importlib.util.module_from_spec(_spec)
)  # dataclasses look it up
_spec.loader.exec_module(device_run)

PARTS = "train-fsdp,ceilings,bench-sampling"


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_run")
    cmd = [
        "bash",
        str(REPO / "bench" / "device_run.sh"),
        str(out),
        "--cpu-dry-run",
        "--only",
        PARTS,
        "--budget-s",
        "400",
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"},
    )
    return out, proc


@pytest.mark.slow
def test_dry_run_passes_and_reaches_every_asked_part(dry):
    out, proc = dry
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    status = json.loads((out / "status.json").read_text())
    assert status["info"]["preflight"] == "ok" and status["info"]["dry_run"] is True
    assert [p["name"] for p in status["parts"]] == PARTS.split(",")
    assert all(p["status"] == "ok" for p in status["parts"]), status["parts"]


@pytest.mark.slow
def test_dry_run_output_fits_what_the_device_returns(dry):
    out, _ = dry
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in files} <= {
        "summary.md",
        "results.jsonl",
        "status.json",
        "logs.tar.gz",
        "trace.json.gz",
    }
    assert len(files) <= 8 and all(p.stat().st_size < 16 << 20 for p in files)
    assert all(p.parent == out for p in files), "the work folder must not be left in the output"
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["part"] for r in rows} == set(PARTS.split(","))  # every part wrote its rows
    smoke = [r for r in rows if r["part"] == "train-fsdp"]
    assert smoke and smoke[0]["ok"] and smoke[0]["steps"] == 5
    summary = (out / "summary.md").read_text()
    assert "| train-fsdp | ok |" in summary and "Ceilings" in summary


@pytest.mark.slow
def test_every_gpu_command_line_parses():
    # The rehearsal parses the GPU argv of each bench part with --help; here for every part at once.
    for step in device_run.STEPS:
        if not step.parse_check:
            continue
        argv = [a.replace("{W}", "/tmp/x") for a in step.gpu]
        proc = subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"{step.name}: {proc.stderr[-2000:]}"


def test_unknown_part_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        device_run.main([str(tmp_path), "--cpu-dry-run", "--only", "bench-nope"])
    assert e.value.code == 2
