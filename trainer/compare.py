"""The paper's comparison: SFT vs multi-turn PPO vs trajectory-level GRPO vs single-turn GRPO.

`python -m trainer.compare --config configs/compare-tiny-cpu.toml` runs, for each seed:
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
import re
import shlex
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer.bound import check_bound, expert_trajectories, lower_bound
from trainer.config import ConfigError, algo_stages, build_config, dump_toml, load_toml
from trainer.stages import STAGES, rl_stage_names
from trainer.stats import paired_over_seeds, pooled_success

_REPO = Path(__file__).resolve().parents[1]


@dataclass(kw_only=True)
class CompareConfig:
    base: str = "configs/tiny-cpu.toml"
    """Train config the runs start from; the other sections of the compare file override it."""
    methods: list[str] = field(default_factory=lambda: ["sft", "ppo", "grpo-multiturn", "grpo"])
    """Rows of the table: 'sft' and the RL methods (which always start from the seed's SFT run)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds (model init, data order, sampling) of independent repeats."""
    sample_budget: int = 256
    """Sampled responses per RL method (the shared budget)."""
    out_dir: str = "runs/compare"
    """Where the runs, comparison.md/json and plots/ go."""
    launcher: str = ""
    """Command prefix for each run, e.g. 'torchrun --nproc_per_node=8' (empty: in this process)."""
    bound_sampled_episodes: int = 1
    """Sampled episodes per eval game for the sampling-policy bound check (0: greedy check only)."""

    def __post_init__(self):
        known = ("sft", *rl_stage_names())
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise ConfigError(f"compare.methods has unknown methods {bad}; choose from {list(known)}")
        if not self.seeds or self.sample_budget <= 0 or self.bound_sampled_episodes < 0:
            raise ConfigError("compare: need seeds, sample_budget > 0, bound_sampled_episodes >= 0")

    @property
    def gpus(self) -> int:
        m = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", self.launcher)
        return int(m.group(1)) if m else 1


def load_compare_config(path: str | Path) -> tuple[CompareConfig, dict]:
    """(CompareConfig, the merged train-config sections) from a compare TOML."""
    raw = load_toml(path)
    section = raw.pop("compare", {})
    types = typing.get_type_hints(CompareConfig)
    unknown = sorted(set(section) - set(types))
    if unknown:
        raise ConfigError(f"unknown compare keys {unknown}; keys: {sorted(types)}")
    cc = CompareConfig(**section)
    base_path = Path(cc.base) if Path(cc.base).is_absolute() else _REPO / cc.base
    train_raw = load_toml(base_path)
    for sec, values in raw.items():
        train_raw.setdefault(sec, {}).update(values)
    build_config(train_raw)  # validate the merged sections before any work
    return cc, train_raw


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
        sft["eval"] = {**sft.get("eval", {}), "random_baseline": seed == cc.seeds[0]}
        specs.append(RunSpec(sft_name, "sft", seed, sft))
        for method in (m for m in cc.methods if m != "sft"):
            steps, _ = rl_steps(method, train_raw, cc.sample_budget)
            section = STAGES[method].section
            rl = _merge(train_raw, common)
            rl = _merge(
                rl,
                {
                    "run": {"name": f"{method}-s{seed}", "stages": [method]},
                    "model": {"path": str(out_dir / sft_name / "final")},
                    "eval": {"random_baseline": False},
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
    print(f"[compare] {spec.name}: training ({cfg_path})", flush=True)
    if cc.launcher:
        cmd = [*shlex.split(cc.launcher), str(_REPO / "trainer" / "main.py"), "--config", str(cfg_path)]
        subprocess.run(cmd, check=True)
        return
    from trainer.main import main

    if main(["--config", str(cfg_path)]) != 0:
        raise RuntimeError(f"run {spec.name} failed (config {cfg_path})")


def _stage_rows(run_dir: Path, kind: str) -> list[dict]:
    from trainer.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if r.get("kind") == kind] if path.exists() else []


def _split_of(game: str, splits: list[str]) -> str:
    """The eval split a game belongs to: the split directory on its path (generated games live under
    <games_dir>/<split>/, ALFWorld's own under json_2.1.1/<split>/); 'unknown' if none is."""
    return next((p for p in reversed(Path(game).parts) if p in splits), "unknown")


def _eval_fields(rep: dict, splits: list[str]) -> dict:
    """An eval report's columns and its per-episode outcomes ({game, split, won, failed})."""
    episodes = [
        {"game": e["game"], "split": _split_of(e["game"], splits), "won": bool(e["won"]),
         "failed": bool(e.get("failed", False))}
        for e in rep["episodes"]
    ]  # fmt: skip
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
        "eval_seconds": timings.get(f"eval/{spec.method}"),
        "tokens_per_gpu": tokens,
    }


ZERO_SHOT = "zero-shot"
"""The row of the model before fine-tuning: an SFT run's eval/zero-shot.json (eval.zero_shot = true)."""


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


# ----------------------------------------------------------------------------- report
_SPLIT_ORDER = ("valid_seen", "valid_unseen")


def _mean_std(xs: list) -> tuple[float | None, float | None]:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _pct(m, s=None) -> str:
    if m is None:
        return "-"
    return f"{100 * m:.1f}%" + (f" ± {100 * s:.1f}" if s else "")


def _num(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _display(method: str) -> str:
    return "zero-shot (no fine-tuning)" if method == ZERO_SHOT else STAGES[method].method


def _outcomes(rs: list[dict], split: str | None = None) -> dict[int, dict[str, bool]]:
    """{seed: {game: won}} of one method's runs (one split, or all). An episode lost to an env failure
    counts as not won, as in the eval report; a game or seed seen twice is an error, not a merge."""
    out: dict[int, dict[str, bool]] = {}
    for r in rs:
        if r["seed"] in out:
            raise ValueError(f"{r['run']}: a second {r['method']} run for seed {r['seed']}")
        games: dict[str, bool] = {}
        for e in r["episodes"]:
            if split is None or e["split"] == split:
                if e["game"] in games:
                    raise ValueError(f"{r['run']}: game {e['game']} evaluated twice")
                games[e["game"]] = e["won"]
        out[r["seed"]] = games
    return out


def _splits(rs: list[dict]) -> list[str]:
    seen = {e["split"] for r in rs for e in r["episodes"]}
    return [s for s in _SPLIT_ORDER if s in seen] + sorted(seen - set(_SPLIT_ORDER))


def summarize(results: list[dict], cc: CompareConfig) -> dict:
    """Per method (the zero-shot row first when evaluated, then cc.methods): mean and std over seeds of
    every column; "success": per split group ("all" and each eval split) the success pooled over seeds
    with its 95% Wilson interval and the per-seed values (trainer.stats.pooled_success); "vs_sft": the
    same groups' paired comparison with SFT of the same seed on the same games, per game, pooled over
    seeds, exact McNemar p (trainer.stats.paired_over_seeds; absent for SFT itself or without an SFT
    row); "env_failures_total": episodes lost to env failures, summed over seeds."""
    by_method: dict[str, list[dict]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    sft = by_method.get("sft", [])
    out = {}
    for method in (ZERO_SHOT, *cc.methods):
        rs = by_method.get(method, [])
        if not rs:
            continue
        tasks = sorted({t for r in rs for t in r["per_task"]})
        row = {"method": method, "seeds": [r["seed"] for r in rs]}
        for key in ("success_rate", "action_accuracy", "mean_steps_success", "expert_mean_steps",
                    "invalid_action_rate", "env_failures", "samples", "env_steps", "train_seconds",
                    "tokens_per_gpu"):  # fmt: skip
            row[key] = _mean_std([r.get(key) for r in rs])
        row["per_task"] = {t: _mean_std([r["per_task"].get(t) for r in rs]) for t in tasks}
        row["env_failures_total"] = sum(int(r.get("env_failures") or 0) for r in rs)
        groups = {"all": None, **{s: s for s in _splits(rs)}}
        row["success"] = {g: pooled_success(_outcomes(rs, s)) for g, s in groups.items()}
        if method != "sft" and sft:
            row["vs_sft"] = {
                g: paired_over_seeds(_outcomes(rs, s), _outcomes(sft, s)) for g, s in groups.items()
            }
        out[method] = row
    return out


def _ci(s: dict | None) -> str:
    if s is None:
        return "-"
    lo, hi = s["ci95"]
    return f"{100 * s['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({s['successes']}/{s['episodes']})"


def _success_table(summary: dict) -> list[str]:
    splits = [s for s in _SPLIT_ORDER if any(s in r["success"] for r in summary.values())]
    splits += sorted({s for r in summary.values() for s in r["success"]} - {"all", *splits})
    head = ["method", "success [95% CI] (won/episodes)", "per seed", *splits,
            "vs SFT: wins / losses (both won, both lost)", "McNemar p"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in summary.items():
        s = row["success"]
        per_seed = ", ".join(f"s{seed} {_pct(v['rate'])}" for seed, v in s["all"]["per_seed"].items())
        cells = [_display(method), _ci(s["all"]), per_seed, *[_ci(s.get(sp)) for sp in splits]]
        v = row.get("vs_sft", {}).get("all")
        if v is None:
            cells += ["-", "-"]
        else:
            cells += [f"{v['wins']} / {v['losses']} ({v['ties_success']}, {v['ties_fail']})", f"{v['p']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cost_table(summary: dict) -> list[str]:
    tasks = sorted({t for row in summary.values() for t in row["per_task"]})
    short = {t: t.replace("pick_and_place_simple", "pick").replace("look_at_obj_in_light", "look")
             .replace("pick_clean_then_place_in_recep", "clean").replace("pick_heat_then_place_in_recep", "heat")
             .replace("pick_cool_then_place_in_recep", "cool").replace("pick_two_obj_and_place", "pick2") for t in tasks}  # fmt: skip
    head = ["method", *[short[t] for t in tasks], "action acc", "steps on wins (expert)", "invalid",
            "env failures", "samples", "env steps", "train s", "tokens/GPU"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in summary.items():
        s = row["mean_steps_success"][0]
        e = row["expert_mean_steps"][0]
        cells = [_display(method)]
        cells += [_pct(*row["per_task"][t]) if t in row["per_task"] else "-" for t in tasks]
        cells += [_pct(row["action_accuracy"][0]), f"{_num(s)} ({_num(e)})", _pct(row["invalid_action_rate"][0]),
                  f"{row['env_failures_total']}/{row['success']['all']['episodes']}",
                  _num(row["samples"][0], "{:.0f}"), _num(row["env_steps"][0], "{:.0f}"),
                  _num(row["train_seconds"][0]), _num(row["tokens_per_gpu"][0], "{:.3g}")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(summary: dict, results: list[dict], cc: CompareConfig, meta: dict) -> str:
    """comparison.md: the success table (intervals, per seed, per split, paired vs SFT), the per-step
    quality and cost table, and the lower-bound check of every trained checkpoint in `results`."""
    lines = [
        f"# Comparison ({meta['config']})",
        "",
        f"Seeds {cc.seeds}; every RL method starts from the seed's SFT checkpoint with a budget of "
        f"{cc.sample_budget} sampled responses (single-turn GRPO: exactly; multi-turn: at most, episodes end "
        f"early on success); {meta['eval_games']} held-out eval games, {meta['decoding']} decoding; {cc.gpus} GPU(s)/process(es) "
        f"per run; device {meta['device']}.",
        "",
        "## Multi-turn success",
        "",
        "Success pooled over seeds (every seed's episodes) with its 95% Wilson score interval; per seed; per "
        "eval split. vs SFT: each game played by the method's seed-s run and SFT's seed-s run, pooled over "
        "seeds: wins = the method won and SFT lost, losses = the reverse; p = exact two-sided McNemar (sign) "
        "test on wins vs losses. An episode lost to an env failure counts as not won. Seeds share the eval "
        "games, so the interval covers episode noise, not the choice of games."
        + (" The zero-shot row pools the SFT runs that evaluated their (common) starting model: with "
           "deterministic decoding, a second seed repeats the same episodes." if ZERO_SHOT in summary else ""),
        "",
        *_success_table(summary),
        "",
        "## Per-step quality and cost (mean over seeds)",
        "",
        "Per task type: success, mean ± std over seeds. Action accuracy: the policy's action = the expert's, "
        "on the states the policy visits. Env failures: episodes lost to an env crash or hang, over all seeds.",
        "",
        *_cost_table(summary),
    ]  # fmt: skip
    lines += ["", "## Lower-bound check per checkpoint", "",
              "p_t = pi(expert action | expert state) at T=1 along the expert trajectories of the eval games; "
              "bound = mean over games of prod_t p_t (sampling) or prod_t 1{eval policy = expert} (greedy: the evaluation's deterministic decoding).", "",
              "| run | action acc | mean p_t | greedy step acc | greedy bound | greedy success | ok | sampled bound | sampled success | ok |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        b, c = r["bound"], r["bound_check"]
        lines.append(
            f"| {r['run']} | {_pct(r['action_accuracy'])} | {_num(b['mean_step_prob'], '{:.3f}')} | "
            f"{_pct(b['greedy_step_accuracy'])} | {_pct(b['bound_greedy'])} | {_pct(r['success_rate'])} | "
            f"{'yes' if c['greedy_ok'] else 'NO'} | {_num(b['bound_sampled'], '{:.2e}')} | "
            f"{_pct(b.get('sampled_success'))} | {'-' if 'sampled_ok' not in c else 'yes' if c['sampled_ok'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_success(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for method in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == method and r["action_accuracy"] is not None]
        ax.scatter(
            [r["action_accuracy"] for r in rs], [r["success_rate"] for r in rs], label=STAGES[method].method
        )
    xs = [i / 50 for i in range(51)]
    ax.plot(xs, xs, ":", color="gray", lw=0.8, label="y = x")
    ax.set_xlabel("action accuracy (vs expert, visited states)")
    ax.set_ylabel("multi-turn success rate")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("success vs action accuracy (one point per checkpoint)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_comparison(config_path: str) -> dict:
    """Run (or reuse) every run, the bound checks, and write comparison.md/json and the plot."""
    cc, train_raw = load_compare_config(config_path)
    out_dir = Path(cc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs = plan_runs(cc, train_raw)
    results, baselines = [], []
    for spec in specs:
        _run(spec, cc)
        if spec.method in cc.methods:
            results.append(collect_result(spec, cc))
        if (zero_shot := collect_zero_shot(spec, cc)) is not None:
            baselines.append(zero_shot)
    games = sorted({g for r in results for g in r["eval_games"]})
    train_cfg = build_config(train_raw)
    traj = expert_trajectories(
        games, out_dir / "bound-expert-states.jsonl", max_steps=train_cfg.eval.max_steps
    )
    for r in results:
        cache = out_dir / r["run"] / "eval" / "bound.json"
        if cache.exists():
            b = json.loads(cache.read_text())
        else:
            b = lower_bound(
                out_dir / r["run"] / "final",
                traj,
                train_cfg,
                sampled_episodes=cc.bound_sampled_episodes,
                seed=r["seed"],
            )
            cache.write_text(json.dumps(b, indent=1))
        r["bound"], r["bound_check"] = b, check_bound(r, b)
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
    }
    doc = {"meta": meta, "compare": asdict(cc), "summary": summary, "runs": results, "baselines": baselines}
    (out_dir / "comparison.json").write_text(json.dumps(doc, indent=1))
    md = to_markdown(summary, results, cc, meta)
    (out_dir / "comparison.md").write_text(md)
    plot_accuracy_vs_success(results, out_dir / "plots" / "accuracy_vs_success.png")
    print(md, flush=True)
    return doc


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--config":
        print("usage: python -m trainer.compare --config configs/compare-tiny-cpu.toml", file=sys.stderr)
        return 2
    try:
        run_comparison(argv[1])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
