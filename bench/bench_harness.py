"""Benchmark of the ALFWorld harness: generation, expert states, env latency, pool throughput, evaluation.

What the default CPU run (`make train`) pays for, and what a GPU user's evaluation costs per game:
- generation of `--train` train + `--eval` valid_unseen games (expert check included), cold (fresh
  translation cache) and re-run (reuse), and `collect_states` over the train games;
- per-env latency in one process: first load (cold and from the disk cache), reset, step (random
  admissible actions), for the handcoded expert, the planner, and the stock TextWorld stack
  (no caches) as the reference -- median with p20/p80 over all calls;
- `EnvPool` throughput (random actions, 8 live episodes per worker) with 1, 2, 4 workers;
- `evaluate` wall time for the expert and random policies on the eval games, 1 and 2 workers.

    python bench/bench_harness.py [--quick] [--out-dir bench/results]

Appends one JSONL row per measurement (hardware, versions, git sha, command) to
<out-dir>/harness.jsonl and writes a markdown summary to <out-dir>/harness.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def _pcts(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=5) if len(xs) > 1 else [xs[0]] * 4
    return {
        "median_ms": round(1e3 * statistics.median(xs), 2),
        "p20_ms": round(1e3 * q[0], 2),
        "p80_ms": round(1e3 * q[3], 2),
    }


def _latency(games, expert: str, caches: bool, steps: int, seed: int = 0) -> dict:
    """In-process load/reset/step latency; runs in a subprocess so caches start cold."""
    code = f"""
import json, random, sys, time
paths = json.loads(sys.argv[1])
from singleturn.harness.env import AlfredGame
g = AlfredGame({expert!r}, caches={caches})
load, load2, reset, step = [], [], [], []
for p in paths:
    t = time.perf_counter(); g.load(p); load.append(time.perf_counter() - t)
    t = time.perf_counter(); g.load(p); load2.append(time.perf_counter() - t)
    t = time.perf_counter(); r = g.reset(seed=0); reset.append(time.perf_counter() - t)
    rng = random.Random({seed})
    for _ in range({steps}):
        t = time.perf_counter(); r = g.step(rng.choice(r.admissible)); step.append(time.perf_counter() - t)
print(json.dumps([load, load2, reset, step]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps([str(g) for g in games])],
        capture_output=True,
        text=True,
        check=True,
    )
    load, load2, reset, step = json.loads(out.stdout)
    return {"load": _pcts(load), "load_again": _pcts(load2), "reset": _pcts(reset), "step": _pcts(step)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 train / 6 eval games, fewer steps")
    ap.add_argument("--train", type=int, default=60)
    ap.add_argument("--eval", type=int, default=24)
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--cpu-smoke", action="store_true", help="same as --quick (the harness is CPU-only)")
    args = ap.parse_args()  # before any game loads (the PDDL translator rewrites sys.argv)
    if args.quick or args.cpu_smoke:
        args.train, args.eval = 12, 6
    work = Path(tempfile.mkdtemp(prefix="bench_harness_"))
    os.environ.setdefault("ALFWORLD_DATA", str(REPO / "data" / "alfworld"))
    os.environ["HARNESS_CACHE_DIR"] = str(work / "cache")  # cold translation cache for honest timings

    from singleturn import harness
    from singleturn.harness.rollout import run_episodes

    rows = []

    def record(name: str, **fields):
        rows.append({"name": name, **fields})
        print(json.dumps(rows[-1]), flush=True)

    # 2 workers first: its forked children leave this process's in-memory caches cold for the
    # in-process 1-worker run.
    for workers in (2, 1):
        os.environ["HARNESS_CACHE_DIR"] = str(work / f"cache_gen{workers}")  # both runs start cold
        t0 = time.perf_counter()
        train = harness.generate_games(
            work / f"train{workers}", "train", args.train, seed=0, num_workers=workers
        )
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        harness.generate_games(work / f"train{workers}", "train", args.train, seed=0, num_workers=workers)
        manifest = json.loads((work / f"train{workers}" / "manifest.json").read_text())
        record(
            "generate_train",
            games=args.train,
            workers=workers,
            seconds=round(cold, 2),
            reuse_seconds=round(time.perf_counter() - t0, 3),
            regenerated=manifest["regenerated"],
        )
    os.environ["HARNESS_CACHE_DIR"] = str(work / "cache")
    t0 = time.perf_counter()
    evals = harness.generate_games(work / "valid_unseen", "valid_unseen", args.eval, seed=1, num_workers=2)
    record("generate_valid_unseen", games=args.eval, workers=2, seconds=round(time.perf_counter() - t0, 2))
    os.environ["HARNESS_CACHE_DIR"] = str(work / "cache_gen2")  # as in `make train`: generation warmed it
    for workers in (1, 2):
        t0 = time.perf_counter()
        n = harness.collect_states(train, work / "states.jsonl", num_workers=workers)
        record(
            "collect_states",
            games=len(train),
            workers=workers,
            states=n,
            seconds=round(time.perf_counter() - t0, 2),
        )

    lat_games = evals[: min(6, len(evals))]
    steps = 10 if args.quick else 25
    for expert, caches in (("handcoded", True), ("planner", True), ("handcoded", False)):
        os.environ["HARNESS_CACHE_DIR"] = str(work / f"cache_latency_{expert}_{caches}")  # cold first load
        record(
            "latency",
            expert=expert,
            caches=caches,
            games=len(lat_games),
            **_latency(lat_games, expert, caches, steps),
        )
    os.environ["HARNESS_CACHE_DIR"] = str(work / "cache")

    for workers in (1, 2, 4):
        rng = random.Random(0)
        t0 = time.perf_counter()
        eps = run_episodes(
            evals,
            lambda s, rng=rng: [rng.choice(x["admissible"]) for x in s],
            max_steps=args.max_steps,
            num_workers=workers,
        )
        dt = time.perf_counter() - t0
        n = sum(e.steps for e in eps)
        record(
            "pool_random",
            workers=workers,
            games=len(evals),
            env_steps=n,
            seconds=round(dt, 2),
            steps_per_s=round(n / dt, 1),
        )

    for policy in ("expert", "random"):
        for workers in (1, 2):
            rep = harness.evaluate(policy, evals, max_steps=args.max_steps, num_workers=workers)
            record(
                "evaluate",
                policy=policy,
                workers=workers,
                games=len(evals),
                max_steps=args.max_steps,
                seconds=rep.meta["seconds"],
                success_rate=rep.success_rate,
                action_accuracy=rep.action_accuracy,
                mean_steps_success=rep.mean_steps_success,
            )

    env = {
        "hardware": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        **harness.versions(),
        "git_sha": _git_sha(),
        "command": shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "harness.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps({**row, **env}) + "\n")
    (out / "harness.md").write_text(_markdown(rows, env))
    print((out / "harness.md").read_text())


def _markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# Harness benchmark",
        "",
        f"{env['cpus']} CPUs ({env['hardware']}), 1-min load average at the end {env['load_avg_1m']}, "
        f"alfworld {env['alfworld']}, textworld {env['textworld']}, git {env['git_sha'][:10]}, {env['date']}.",
        f"Command: `{env['command']}`",
        "",
        "## Generation and expert states",
        "",
        "| what | games | workers | seconds | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["name"] == "generate_train":
            note = f"re-run (reuse) {r['reuse_seconds']} s; {r['regenerated']} unsolvable draws regenerated"
            lines.append(f"| generate train | {r['games']} | {r['workers']} | {r['seconds']} | {note} |")
        elif r["name"] == "generate_valid_unseen":
            lines.append(f"| generate valid_unseen | {r['games']} | {r['workers']} | {r['seconds']} | |")
        elif r["name"] == "collect_states":
            lines.append(
                f"| collect_states | {r['games']} | {r['workers']} | {r['seconds']} | {r['states']} states |"
            )
    lines += [
        "",
        "## Per-env latency (one process; median [p20, p80] ms)",
        "",
        "| expert | caches | first load | load again | reset | step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["name"] == "latency":
            cells = [
                f"{r[k]['median_ms']} [{r[k]['p20_ms']}, {r[k]['p80_ms']}]"
                for k in ("load", "load_again", "reset", "step")
            ]
            lines.append(
                f"| {r['expert']} | {'ours' if r['caches'] else 'stock'} | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        "## EnvPool throughput (random actions) and evaluate",
        "",
        "| what | workers | games | seconds | steps/s or result |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["name"] == "pool_random":
            lines.append(
                f"| pool, random actions | {r['workers']} | {r['games']} | {r['seconds']} | {r['steps_per_s']} steps/s |"
            )
        elif r["name"] == "evaluate":
            res = f"success {r['success_rate']}, accuracy {r['action_accuracy']}, steps {r['mean_steps_success']}"
            lines.append(
                f"| evaluate {r['policy']} (max {r['max_steps']} steps) | {r['workers']} | {r['games']} | {r['seconds']} | {res} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
