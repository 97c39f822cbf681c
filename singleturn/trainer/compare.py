"""The paper's comparison: SFT vs multi-turn PPO vs trajectory-level GRPO vs single-turn GRPO.

`python -m singleturn.trainer.compare --config configs/compare-tiny-cpu.toml` runs, for each seed:
  1. `sft-s<seed>`: SFT on the expert states (stages ["sft"]), evaluated multi-turn, exported;
  2. one run per RL method (`ppo`, `grpo-multiturn`, `grpo`) starting from that SFT checkpoint
     (model.path = sft-s<seed>/final) with the SAME SAMPLE BUDGET: `compare.sample_budget` sampled
     responses (one policy decision each). Single-turn GRPO draws batch_size * group_size per step
     exactly; a multi-turn rollout batch draws at most episodes_per_step * ppo.max_steps (episodes
     end early on success), so its step count is budget // that bound and the table reports the
     samples (and env steps) each method actually drew.
Every run goes through `trainer/main.py` (in-process, or `compare.launcher`, e.g. torchrun) with
the same data, tokenizer, eval games and evaluation; finished runs are reused (resumable driver).

Then, per evaluated checkpoint (each run's final/), the paper's lower-bound check (trainer/bound.py).
The report gives every success rate with a 95% Wilson interval (episodes pooled over seeds), its
per-seed values, valid_seen / valid_unseen apart, and each method paired with SFT of the same seed
on the same games (wins / losses, exact McNemar p: trainer/stats.py); an SFT run that evaluated its
starting model (eval.zero_shot) adds a zero-shot row.
Methods, their steps per sample budget and their sample counts come from the stage registry
(trainer/stages/): this file is the experiment, the stages are the library.

Writes <out_dir>/comparison.md, comparison.json and plots/accuracy_vs_success.png.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from singleturn.harness.atomic import write_text_atomic
from singleturn.trainer.bound import check_bound, expert_trajectories, lower_bound
from singleturn.trainer.compare_config import CompareConfig, load_compare_config
from singleturn.trainer.compare_report import ZERO_SHOT, plot_accuracy_vs_success, summarize, to_markdown
from singleturn.trainer.config import ConfigError, algo_stages, build_config, dump_toml
from singleturn.trainer.main import main as train_main
from singleturn.trainer.metrics import read_metrics
from singleturn.trainer.stages import STAGES

_REPO = Path(__file__).resolve().parents[2]


def _merge(raw: dict, overrides: dict) -> dict:
    out = {k: dict(v) for k, v in raw.items()}
    for sec, values in overrides.items():
        out.setdefault(sec, {}).update(values)
    return out


def rl_steps(method: str, train_raw: dict, budget: int) -> tuple[int, int]:
    """(steps, max samples per step) that spend `budget` samples in method's RL stage."""
    per = STAGES[method].samples_per_step(build_config(train_raw))
    return max(1, budget // per), per


@dataclass
class RunSpec:
    name: str
    method: str
    seed: int
    raw: dict


def sft_stages(train_raw: dict) -> list[str]:
    """The base config's stages before RL (e.g. ['lm', 'sft'] for from-scratch models), ending in 'sft'."""
    return algo_stages(build_config(train_raw).run.stages, "sft")


def plan_runs(cc: CompareConfig, train_raw: dict) -> list[RunSpec]:
    """The SFT run and the RL runs of every seed, in execution order."""
    out_dir = Path(cc.out_dir)
    specs = []
    for seed in cc.seeds:
        sft_name = f"sft-s{seed}"
        common = {"run": {"out_dir": str(out_dir), "seed": seed, "plots": False}, "data": {"seed": seed}}
        sft = _merge(train_raw, common)
        sft = _merge(
            sft, {"run": {"name": sft_name, "stages": sft_stages(train_raw)}, "model": {"init_seed": seed}}
        )
        ev = sft.get("eval", {})
        # A pre-trained start (model.path) is the same model for every seed, and ranked/greedy decoding
        # is deterministic: its zero-shot row is evaluated once. From scratch each seed's init differs.
        once = bool(sft.get("model", {}).get("path"))
        zero_shot = bool(ev.get("zero_shot", False)) and (seed == cc.seeds[0] or not once)
        sft["eval"] = {**ev, "random_baseline": seed == cc.seeds[0], "zero_shot": zero_shot}
        specs.append(RunSpec(sft_name, "sft", seed, sft))
        for method in (m for m in cc.methods if m != "sft"):
            steps, _ = rl_steps(method, train_raw, cc.sample_budget)
            section = STAGES[method].section
            rl = _merge(train_raw, common)
            rl = _merge(
                rl,
                {
                    "run": {"name": f"{method}-s{seed}", "stages": [method]},
                    # the seed's SFT export, loaded as it is (not converted from the base's wheel)
                    "model": {"path": str(out_dir / sft_name / "final"), "gguf_wheel": "", "gguf_member": ""},
                    # its start is the seed's SFT row, already evaluated: no zero-shot or random row
                    "eval": {"random_baseline": False, "zero_shot": False},
                    section: {"steps": steps},
                },
            )
            specs.append(RunSpec(f"{method}-s{seed}", method, seed, rl))
    return specs


def _run(spec: RunSpec, cc: CompareConfig) -> None:
    """Train + evaluate one run (skipped when its eval and final/ exist)."""
    run_dir = Path(cc.out_dir) / spec.name
    if (run_dir / "eval" / f"{spec.method}.json").exists() and (run_dir / "final" / "config.json").exists():
        print(f"[compare] {spec.name}: done, reusing", flush=True)
        return
    cfg_path = Path(cc.out_dir) / "configs" / f"{spec.name}.toml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(dump_toml(spec.raw))
    # A killed earlier attempt left its config.json: continue it (its last checkpoint, the finished
    # episodes of a cut evaluation); --resume refuses it if the settings changed since.
    resume = ["--resume"] if (run_dir / "config.json").exists() else []
    print(f"[compare] {spec.name}: {'resuming' if resume else 'training'} ({cfg_path})", flush=True)
    args = ["--config", str(cfg_path), *resume]
    if cc.launcher:
        subprocess.run([*shlex.split(cc.launcher), str(_REPO / "trainer" / "main.py"), *args], check=True)
        return

    rc = train_main(args)
    if rc in (130, 143):  # SIGINT / SIGTERM: the run saved its step; the comparison stops here
        print(
            f"[compare] {spec.name}: interrupted after a checkpoint; re-run the same command to resume",
            flush=True,
        )
        raise SystemExit(rc)
    if rc != 0:
        raise RuntimeError(f"run {spec.name} failed (exit {rc}; config {cfg_path})")


def _stage_rows(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if r.get("kind") == kind] if path.exists() else []


def _split_of(game: str, splits: list[str]) -> str:
    """The eval split a game belongs to: the split directory on its path (generated games live under
    <games_dir>/<split>/, ALFWorld's own under json_2.1.1/<split>/); 'unknown' if none is."""
    return next((p for p in reversed(Path(game).parts) if p in splits), "unknown")


def _eval_fields(rep: dict, splits: list[str]) -> dict:
    """An eval report's columns and its per-episode outcomes ({game, split, won, failed})."""
    episodes = [
        {
            "game": e["game"],
            "split": _split_of(e["game"], splits),
            "won": bool(e["won"]),
            "failed": bool(e.get("failed", False)),
        }
        for e in rep["episodes"]
    ]
    return {
        "success_rate": rep["success_rate"],
        "per_task": {t: v["success_rate"] for t, v in (rep.get("per_task") or {}).items()},
        "action_accuracy": rep.get("action_accuracy"),
        "mean_steps_success": rep.get("mean_steps_success"),
        "expert_mean_steps": rep.get("expert_mean_steps"),
        "invalid_action_rate": rep.get("invalid_action_rate"),
        "env_failures": rep.get("env_failures"),
        "eval_games": [e["game"] for e in episodes],
        "episodes": episodes,
    }


def _timings(run_dir: Path) -> dict:
    path = run_dir / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def collect_result(spec: RunSpec, cc: CompareConfig) -> dict:
    """One run's numbers: its eval report, samples / env steps drawn, wall-clock, tokens per GPU."""
    run_dir = Path(cc.out_dir) / spec.name
    cfg = build_config(spec.raw)
    rep = json.loads((run_dir / "eval" / f"{spec.method}.json").read_text())
    timings = _timings(run_dir)
    kinds = sft_stages(spec.raw) if spec.method == "sft" else [spec.method]  # the SFT row pays for 'lm' too
    rows = [r for k in kinds for r in _stage_rows(run_dir, k)]
    samples = STAGES[spec.method].samples(cfg, rows)
    env_steps = sum(int(r.get("env_steps", 0)) for r in rows)
    tokens = sum(float(r.get("tokens_per_s", 0.0)) * float(r.get("time_train", 0.0)) for r in rows)
    return {
        "run": spec.name,
        "method": spec.method,
        "seed": spec.seed,
        "steps": len(rows),
        "stages": kinds,
        **_eval_fields(rep, cfg.data.eval_splits),
        "samples": samples,
        "env_steps": env_steps,
        "train_seconds": sum(timings.get(f"train/{k}", 0.0) for k in kinds) if timings else None,
        "total_seconds": timings.get("total"),
        "eval_seconds": timings.get(f"eval/{spec.method}"),
        "tokens_per_gpu": tokens,
        "holdout_agreement": _holdout_agreement(run_dir, kinds),
    }


def _holdout_agreement(run_dir: Path, kinds: list[str]) -> float | None:
    """The run's last held-out agreement (eval.holdout_states, trainer/holdout.py) in its own stages."""
    rows = [r for r in _stage_rows(run_dir, "holdout") if r.get("stage") in kinds]
    return max(rows, key=lambda r: r["step"])["agreement"] if rows else None


def collect_zero_shot(spec: RunSpec, cc: CompareConfig) -> dict | None:
    """The zero-shot evaluation an SFT run made of its starting model, as a result row (None if absent).
    It trained nothing, so it has no samples, env steps, tokens or checkpoint (no bound check)."""
    run_dir = Path(cc.out_dir) / spec.name
    path = run_dir / "eval" / f"{ZERO_SHOT}.json"
    if spec.method != "sft" or not path.exists():
        return None
    rep = json.loads(path.read_text())
    return {
        "run": f"{spec.name}/{ZERO_SHOT}",
        "method": ZERO_SHOT,
        "seed": spec.seed,
        "steps": 0,
        "stages": [],
        **_eval_fields(rep, build_config(spec.raw).data.eval_splits),
        "samples": None,
        "env_steps": None,
        "train_seconds": None,
        "eval_seconds": _timings(run_dir).get(f"eval/{ZERO_SHOT}"),
        "tokens_per_gpu": None,
    }


def _bound(run_dir: Path, traj: dict, train_cfg, cc: CompareConfig, *, seed: int) -> dict:
    """The run's lower-bound check (eval/bound.json: computed once, then reused)."""
    cache = run_dir / "eval" / "bound.json"
    if cache.exists():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    b = lower_bound(run_dir / "final", traj, train_cfg, sampled_episodes=cc.bound_sampled_episodes, seed=seed)
    b["seconds"] = round(time.perf_counter() - t0, 1)
    write_text_atomic(cache, json.dumps(b, indent=1))
    print(
        f"[compare] {run_dir.name}: teacher-forced step accuracy {b['greedy_step_accuracy']}, "
        f"greedy bound {b['bound_greedy']:.3f} ({b['seconds']:.0f} s)",
        flush=True,
    )
    return b


def run_comparison(config_path: str) -> dict:
    """Run (or reuse) every run, the bound checks, and write comparison.md/json and the plot."""
    cc, train_raw = load_compare_config(config_path)
    out_dir = Path(cc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs = plan_runs(cc, train_raw)
    train_cfg = build_config(train_raw)
    results, baselines, traj = [], [], None
    for i, spec in enumerate(specs):  # each piece reported as it finishes: a killed comparison keeps all
        _run(spec, cc)
        if spec.method in cc.methods:
            r = collect_result(spec, cc)
            if traj is None:  # every run plays the same eval games
                traj = expert_trajectories(
                    sorted(r["eval_games"]),
                    out_dir / "bound-expert-states.jsonl",
                    max_steps=train_cfg.eval.max_steps,
                )
            b = _bound(out_dir / r["run"], traj, train_cfg, cc, seed=r["seed"])
            r["bound"], r["bound_check"] = b, check_bound(r, b)
            results.append(r)
        if (zero_shot := collect_zero_shot(spec, cc)) is not None:
            baselines.append(zero_shot)
        pending = [s.name for s in specs[i + 1 :]]
        if results or not pending:
            doc = _report(config_path, cc, train_cfg, results, baselines, pending, t0, final=not pending)
    return doc


def _report(config_path, cc, train_cfg, results, baselines, pending, t0, *, final: bool) -> dict:
    """comparison.json / .md and the plot from the runs finished so far (`pending`: the rest)."""
    out_dir = Path(cc.out_dir)
    games = sorted({g for r in results for g in r["eval_games"]})
    summary = summarize(results + baselines, cc)
    meta = {
        "config": str(config_path),
        "eval_games": len(games),
        "decoding": train_cfg.eval.decoding
        + (
            " (admissible trie)" if train_cfg.eval.constrained and train_cfg.eval.decoding == "greedy" else ""
        ),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "seconds": round(time.perf_counter() - t0, 1),
        "budget_unit": "sampled responses (policy decisions)",
        "pending": pending,
        # every piece's own wall-clock (each run's timings total + its lower-bound check), whatever
        # session ran it: the comparison's cost, independent of how often it was resumed
        "piece_seconds": round(
            sum((r.get("total_seconds") or 0.0) + (r["bound"].get("seconds") or 0.0) for r in results), 1
        ),
    }
    doc = {"meta": meta, "compare": asdict(cc), "summary": summary, "runs": results, "baselines": baselines}
    write_text_atomic(out_dir / "comparison.json", json.dumps(doc, indent=1))
    md = to_markdown(summary, results, cc, meta)
    write_text_atomic(out_dir / "comparison.md", md)
    plot_accuracy_vs_success(results, out_dir / "plots" / "accuracy_vs_success.png")
    if final:
        print(md, flush=True)
    else:
        print(f"[compare] report written with {len(results)} runs; pending: {', '.join(pending)}", flush=True)
    return doc


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--config":
        print(
            "usage: python -m singleturn.trainer.compare --config configs/compare-tiny-cpu.toml",
            file=sys.stderr,
        )
        return 2
    try:
        run_comparison(argv[1])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
