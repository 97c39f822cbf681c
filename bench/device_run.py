"""One call on a bare GPU machine: correctness first, then speed, each part time-boxed.

    bash bench/device_run.sh OUT_DIR                  # on the GPU machine (python3 with torch, triton)
    bash bench/device_run.sh OUT_DIR --cpu-dry-run    # the rehearsal, on any CPU machine
    bash bench/device_run.sh OUT_DIR --only tests-kernels,bench-token-logprobs   # a re-run of some parts

The machine it is written for starts bare: python3 with torch, triton, transformers, safetensors,
tokenizers, pytest, numpy; no network, no venv, no ALFWorld, not this project. Nothing is installed:
the repository root goes on PYTHONPATH, and a preflight (the namespace probe of tests/packaging: our
ops import and run, transformers loads a model, every module resolves where it should) stops the run
with exit status 2 before anything else when the image lacks something.

Parts, in order of value (STEPS below): the kernel and CUDA-op tests on the device (compiled Triton,
the CUDA sampler), the model's CUDA tests (FlexAttention tree masks vs dense attention, bf16 vs
transformers by the 2x rule, generation and ranking vs the CPU), a hand-FSDP training run (SFT + GRPO,
NCCL, bf16) through `torchrun trainer/main.py` on a synthetic states file; then the ceilings (copy
GB/s, matmul TFLOP/s), `token_logprobs` fused vs unfused, train steps (LLaMA-3.2-1B shape and
SmolLM2-135M shape, random weights), rollout tokens/s at several batch sizes, the evaluation engine
(per-state re-encoding vs the episode cache), prefix sharing, the GRPO loss, the sampler, and a
profiler trace. A part runs in its own process group under a time limit
(min(its own, what is left of --budget-s)); one that fails or times out is recorded and the rest run;
a part that no longer fits is skipped and said so.

Everything lands in OUT_DIR as at most five files, each well under 16 MB (what such a machine can
return): summary.md (the status table, then every part's markdown table), results.jsonl (every
benchmark row, tagged with its part), status.json, logs.tar.gz (each part's log, JUnit XML, tables,
the training run's metrics) and trace.json.gz (the profiler's chrome trace, when it fits).
Exit status: 0 when every part that ran passed, 1 when any failed or timed out, 2 preflight.

--cpu-dry-run: the same parts on the CPU (TRITON_INTERPRET=1, no CUDA device, --cpu-smoke sizes), and
each GPU command line is also parsed (`... --help` after the real flags) so a bad flag fails here, not
on the device. tests/bench/test_device_run.py runs a reduced rehearsal in `make test`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILE_BYTES = 15 << 20  # the machine returns files of at most 16 MiB
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]


@dataclass
class Step:
    name: str
    gpu: list[str]  # argv after the interpreter, on the GPU; "{W}" is this step's work folder
    dry: list[str] | None = None  # argv on the CPU rehearsal (None: the GPU argv)
    limit_s: int = 60  # on the GPU
    dry_limit_s: int = 300
    parse_check: bool = False  # dry run: also parse the GPU argv (`--help` appended)
    env: dict[str, str] = field(default_factory=dict)


def _bench(script: str, *flags: str) -> list[str]:
    return [f"bench/{script}", "--out-dir", "{W}", *flags]


STEPS: list[Step] = [
    # a. correctness
    # tests/csrc (nvcc/g++ compile, link and host checks) runs in `make test`; its op runs in tests/kernels.
    Step(
        "tests-kernels",
        [*PYTEST, "-m", "gpu or not slow", "tests/kernels", "--junitxml={W}/junit.xml"],
        limit_s=200,
        dry_limit_s=900,
    ),  # H200: 170+ s cold (Triton compiles), 68 s cached
    Step(
        "tests-model-gpu", [*PYTEST, "-m", "gpu", "tests/model", "--junitxml={W}/junit.xml"], limit_s=90
    ),  # 60 s
    Step("train-fsdp", ["bench/device_train_smoke.py", "--work", "{W}"], limit_s=75, dry_limit_s=240),  # 60 s
    # b. speed
    Step(
        "ceilings",
        _bench("bench_ceilings.py", "--quick"),
        _bench("bench_ceilings.py", "--cpu-smoke"),
        limit_s=20,
        parse_check=True,
    ),  # 6 s
    Step(
        "bench-token-logprobs",
        _bench("bench_token_logprobs.py", "--quick"),
        _bench("bench_token_logprobs.py", "--cpu-smoke"),
        limit_s=60,
        parse_check=True,
    ),  # 46 s
    Step(
        "bench-train-step-1b",
        _bench("bench_train_step.py", "--preset", "llama3.2-1b", "--quick"),
        _bench("bench_train_step.py", "--cpu-smoke"),
        limit_s=45,
        parse_check=True,
    ),  # ~35 s
    Step(
        "bench-train-step-smollm2",
        _bench(
            "bench_train_step.py",
            "--preset",
            "smollm2-135m",
            "--quick",
            "--prompt-len",
            "384",
            "--response-len",
            "16",
            "--states",
            "16",
        ),
        _bench("bench_train_step.py", "--cpu-smoke"),
        limit_s=40,
        parse_check=True,
    ),  # 28 s
    Step(
        "bench-rollout",
        _bench(
            "bench_rollout.py",
            "--presets",
            "smollm2-135m",
            "llama3.2-1b",
            "--batch",
            "1",
            "16",
            "64",
            "256",
            "--prompt-len",
            "384",
            "--new-tokens",
            "32",
            "--quick",
        ),
        _bench("bench_rollout.py", "--cpu-smoke"),
        limit_s=75,
        parse_check=True,
    ),  # 61 s
    Step(
        "bench-rollout-graphs",  # decoding was launch-bound on the H200 (2026-12-04): CUDA graphs?
        _bench(
            "bench_rollout.py",
            "--presets",
            "smollm2-135m",
            "--batch",
            "16",
            "128",
            "--prompt-len",
            "384",
            "--new-tokens",
            "32",
            "--compile",
            "none",
            "reduce-overhead",
            "--quick",
        ),
        _bench("bench_rollout.py", "--cpu-smoke"),
        limit_s=120,
        parse_check=True,
    ),
    Step(
        "bench-episodes",  # the evaluation engine: per-state re-encoding vs the episode cache
        _bench("bench_episodes.py", "--preset", "smollm2-135m", "--episodes", "64", "--turns", "8"),
        _bench("bench_episodes.py", "--cpu-smoke"),
        limit_s=60,
        parse_check=True,
    ),
    Step(
        "bench-prefix-sharing",
        _bench("bench_prefix_sharing.py", "--quick"),
        _bench("bench_prefix_sharing.py", "--cpu-smoke"),
        limit_s=60,
        parse_check=True,
    ),  # > 45 s
    Step(
        "bench-grpo-loss",
        _bench("bench_grpo_loss.py", "--quick"),
        _bench("bench_grpo_loss.py", "--cpu-smoke"),
        limit_s=45,
        parse_check=True,
    ),
    Step(
        "bench-sampling",
        _bench("bench_sampling.py", "--quick"),
        _bench("bench_sampling.py", "--cpu-smoke"),
        limit_s=20,
        parse_check=True,
    ),  # 7 s
    Step(
        "profile-grpo-1b",
        [
            "bench/profile_steps.py",
            "--algo",
            "grpo",
            "--preset",
            "llama3.2-1b",
            "--quick",
            "--response-len",
            "32",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--run-dir",
            "{W}",
        ],  # 2 quick steps of 128 decoded tokens: export > 60 s
        ["bench/profile_steps.py", "--algo", "grpo", "--device", "cpu", "--quick", "--run-dir", "{W}"],
        limit_s=90,
        parse_check=True,
    ),  # > 60 s (the trace export)
]


def _run(argv: list[str], *, cwd: Path, env: dict, limit_s: float, log: Path) -> tuple[str, float]:
    """Run argv in its own process group with a time limit, output to log; (status, seconds)."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(1.0, limit_s))
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return f"TIMEOUT ({limit_s:.0f}s)", time.monotonic() - t0
    return ("ok" if rc == 0 else f"FAIL (rc={rc})"), time.monotonic() - t0


def _tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join("    " + ln for ln in lines[-n:])


def _preflight(py: str, env: dict, work: Path, dry: bool) -> tuple[bool, dict]:
    info: dict = {"python": py, "dry_run": dry, "pythonpath": env.get("PYTHONPATH")}
    if not dry:
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"unavailable: {e}"
    log = work / "preflight.log"
    probe = [py, "tests/packaging/namespace_probe.py", str(REPO)]
    status, _ = _run(probe, cwd=REPO, env=env, limit_s=120, log=log)
    versions = (
        "import json, platform, torch, triton, transformers; c = torch.cuda.is_available(); "
        "print(json.dumps({'python_version': platform.python_version(), 'torch': torch.__version__, "
        "'triton': triton.__version__, 'transformers': transformers.__version__, 'cuda': torch.version.cuda, "
        "'cuda_available': c, 'device': torch.cuda.get_device_name() if c else 'cpu'}))"
    )
    out = subprocess.run([py, "-c", versions], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if out.returncode == 0:
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    else:
        status = f"FAIL (versions: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})"
    if not dry and not info.get("cuda_available"):
        status = (
            "FAIL (no CUDA device: torch.cuda.is_available() is False; use --cpu-dry-run on a CPU machine)"
        )
    return status == "ok", {**info, "preflight": status}


def _pack(out: Path, work: Path, records: list[dict], info: dict, wall_s: float) -> None:
    """At most five files in out/: summary.md, results.jsonl, status.json, logs.tar.gz, trace.json.gz."""
    rows = []
    for r in records:
        for jl in sorted((work / r["name"]).glob("*.jsonl")) if (work / r["name"]).is_dir() else []:
            for line in jl.read_text().splitlines():
                if line.strip():
                    try:
                        rows.append({"part": r["name"], **json.loads(line)})
                    except json.JSONDecodeError:
                        rows.append({"part": r["name"], "unparsed": line[:500]})
    (out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out / "status.json").write_text(json.dumps({"info": info, "wall_s": wall_s, "parts": records}, indent=1))
    lines = [
        f"# device run: {info.get('device', '?')} ({'CPU dry run' if info.get('dry_run') else 'GPU'})",
        "",
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {wall_s:.0f} s; python {info.get('python_version')}, "
        f"torch {info.get('torch')}, triton {info.get('triton')}, transformers {info.get('transformers')}, "
        f"CUDA {info.get('cuda')}; nvidia-smi: {info.get('nvidia_smi', '-')}; git {info.get('git', '?')}",
        "",
        "| part | status | seconds | limit |",
        "|---|---|---|---|",
        *(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r['limit_s']:.0f} |" for r in records),
        "",
    ]
    for r in records:
        d = work / r["name"]
        for md in sorted(d.rglob("*.md")) if d.is_dir() else []:
            lines += [f"## {r['name']}: {md.name}", "", md.read_text().strip(), ""]
    (out / "summary.md").write_text("\n".join(lines))
    traces = sorted(work.rglob("trace*.json"))
    if traces:
        with open(traces[0], "rb") as src, gzip.open(out / "trace.json.gz", "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        if (out / "trace.json.gz").stat().st_size > MAX_FILE_BYTES:
            (out / "trace.json.gz").unlink()
            info["trace"] = f"{traces[0].name} over {MAX_FILE_BYTES >> 20} MiB gzipped: left out"
    for t in traces:
        t.unlink()  # in trace.json.gz (or too big); not twice in the logs
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="device_run")
    if (out / "logs.tar.gz").stat().st_size > MAX_FILE_BYTES:  # keep the logs, drop the rest
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(work.rglob("*.log")):
                tar.add(p, arcname=f"device_run/{p.relative_to(work)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="output folder (at most five files land there)")
    p.add_argument("--cpu-dry-run", action="store_true", help="rehearse on a CPU machine")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all parts (GPU 510, dry 3600)")
    p.add_argument("--only", default="", help="comma-separated parts to run (after the preflight)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out")
    p.add_argument("--python", default=sys.executable, help="interpreter for the parts")
    args = p.parse_args(argv)
    names = [s.name for s in STEPS]
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    unknown = sorted(set(only + skip) - set(names))
    if unknown:
        p.error(f"unknown parts {unknown}; known: {names}")
    dry = args.cpu_dry_run
    budget = args.budget_s if args.budget_s is not None else (3600.0 if dry else 510.0)
    t_start = time.monotonic()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("DEVICE_RUN_WORK", "")) if os.environ.get("DEVICE_RUN_WORK") else out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the device

    ok, info = _preflight(args.python, env, work, dry)
    git = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
    info["git"] = git.stdout.strip() or "unknown (no git here)"
    print(
        f"preflight: {info['preflight']}  {json.dumps({k: info.get(k) for k in ('device', 'torch', 'triton', 'transformers', 'python_version')})}",
        flush=True,
    )
    records: list[dict] = []
    if not ok:
        print(_tail(work / "preflight.log", 30), flush=True)
        _pack(out, work, records, info, time.monotonic() - t_start)
        shutil.rmtree(work, ignore_errors=True)
        return 2

    reserve = 15.0  # packing the results
    for step in STEPS:
        if (only and step.name not in only) or step.name in skip:
            continue
        wdir = work / step.name
        wdir.mkdir()
        log = wdir / f"{step.name}.log"
        left = budget - (time.monotonic() - t_start) - reserve
        limit = min(step.dry_limit_s if dry else step.limit_s, left)
        if limit < 10:
            records.append({"name": step.name, "status": "SKIP (budget)", "seconds": 0.0, "limit_s": 0.0})
            print(f"{step.name:26s} SKIP (budget)", flush=True)
            continue
        argv_gpu = [a.replace("{W}", str(wdir)) for a in step.gpu]
        argv = [a.replace("{W}", str(wdir)) for a in step.dry] if (dry and step.dry) else argv_gpu
        status, secs = "ok", 0.0
        if dry and step.parse_check:  # the GPU flags must parse here, not fail on the device
            status, secs = _run([args.python, *argv_gpu, "--help"], cwd=REPO, env=env, limit_s=60, log=log)
            status = status if status == "ok" else f"FAIL (GPU flags: {status})"
        if status == "ok":
            status, s2 = _run([args.python, *argv], cwd=REPO, env={**env, **step.env}, limit_s=limit, log=log)
            secs += s2
        records.append({"name": step.name, "status": status, "seconds": secs, "limit_s": limit})
        print(f"{step.name:26s} {status:18s} {secs:6.1f} s (limit {limit:.0f})", flush=True)
        if status != "ok":
            print(_tail(log), flush=True)

    wall = time.monotonic() - t_start
    _pack(out, work, records, info, wall)
    if not os.environ.get("DEVICE_RUN_KEEP_WORK"):
        shutil.rmtree(work, ignore_errors=True)
    files = sorted(out.iterdir())
    print(
        f"\ndevice run: {wall:.0f} s; {len(files)} files in {out}: "
        + ", ".join(f"{f.name} ({f.stat().st_size >> 10} KiB)" for f in files)
    )
    print((out / "summary.md").read_text().split("\n## ")[0], flush=True)
    failed = [r["name"] for r in records if not (r["status"] == "ok" or r["status"].startswith("SKIP"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
