"""The comparison's report: the tables of comparison.md, the summary of comparison.json, the plot.

`summarize(results, cc)` reduces the per-run result rows (trainer/compare.py `collect_result`,
`collect_zero_shot`) per method: mean and std over seeds, success pooled over seeds with its 95%
Wilson interval, per eval split, and the paired comparison with SFT of the same seed (exact
McNemar; trainer/stats.py). `to_markdown` renders it; `plot_accuracy_vs_success` draws one point
per checkpoint.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from singleturn.harness.tasks import TASK_SHORT
from singleturn.trainer.compare_config import CompareConfig
from singleturn.trainer.stages import STAGES
from singleturn.trainer.stats import paired_over_seeds, pooled_success
from singleturn.trainer.table import num, pct

ZERO_SHOT = "zero-shot"
"""The row of the model before fine-tuning: an SFT run's eval/zero-shot.json (eval.zero_shot = true)."""


_SPLIT_ORDER = ("valid_seen", "valid_unseen")


def _mean_std(xs: list) -> tuple[float | None, float | None]:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


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
        for key in (
            "success_rate",
            "action_accuracy",
            "mean_steps_success",
            "expert_mean_steps",
            "invalid_action_rate",
            "env_failures",
            "samples",
            "env_steps",
            "train_seconds",
            "tokens_per_gpu",
            "holdout_agreement",
        ):
            row[key] = _mean_std([r.get(key) for r in rs])
        # the seed's "action accuracy": teacher-forced on the expert's own held-out states (the bound)
        row["teacher_forced_accuracy"] = _mean_std(
            [(r.get("bound") or {}).get("greedy_step_accuracy") for r in rs]
        )
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
    head = [
        "method",
        "success [95% CI] (won/episodes)",
        "per seed",
        *splits,
        "vs SFT: wins / losses (both won, both lost)",
        "McNemar p",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in summary.items():
        s = row["success"]
        per_seed = ", ".join(f"s{seed} {pct(v['rate'])}" for seed, v in s["all"]["per_seed"].items())
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
    short = {t: TASK_SHORT.get(t, t) for t in tasks}
    holdout = any(row.get("holdout_agreement", (None,))[0] is not None for row in summary.values())
    head = [
        "method",
        *[short[t] for t in tasks],
        *(["held-out agreement"] if holdout else []),
        "teacher-forced acc",
        "acc on visited states",
        "steps on wins (expert)",
        "invalid",
        "env failures",
        "samples",
        "env steps",
        "train s",
        "tokens/GPU",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in summary.items():
        s = row["mean_steps_success"][0]
        e = row["expert_mean_steps"][0]
        cells = [_display(method)]
        cells += [pct(*row["per_task"][t]) if t in row["per_task"] else "-" for t in tasks]
        if holdout:
            cells.append(pct(row.get("holdout_agreement", (None,))[0]))
        cells += [
            pct(row["teacher_forced_accuracy"][0]),
            pct(row["action_accuracy"][0]),
            f"{num(s)} ({num(e)})",
            pct(row["invalid_action_rate"][0]),
            f"{row['env_failures_total']}/{row['success']['all']['episodes']}",
            num(row["samples"][0], "{:.0f}"),
            num(row["env_steps"][0], "{:.0f}"),
            num(row["train_seconds"][0]),
            num(row["tokens_per_gpu"][0], "{:.3g}"),
        ]
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
        f"per run; device {meta['device']}. Wall-clock of the pieces (each run's training and evaluation, "
        f"and its lower-bound check): {meta.get('piece_seconds', 0) / 3600:.2f} h.",
        "",
        *(
            [f"**Partial: {len(meta['pending'])} run(s) still to come:** {', '.join(meta['pending'])}.", ""]
            if meta.get("pending")
            else []
        ),
        "## Multi-turn success",
        "",
        "Success pooled over seeds (every seed's episodes) with its 95% Wilson score interval; per seed; per "
        "eval split. vs SFT: each game played by the method's seed-s run and SFT's seed-s run, pooled over "
        "seeds: wins = the method won and SFT lost, losses = the reverse; p = exact two-sided McNemar (sign) "
        "test on wins vs losses. An episode lost to an env failure counts as not won. Seeds share the eval "
        "games, so the interval covers episode noise, not the choice of games."
        + (
            " The zero-shot row pools the SFT runs that evaluated their (common) starting model: with "
            "deterministic decoding, a second seed repeats the same episodes."
            if ZERO_SHOT in summary
            else ""
        ),
        "",
        *_success_table(summary),
        "",
        "## Per-step quality and cost (mean over seeds)",
        "",
        "Per task type: success, mean ± std over seeds. Teacher-forced accuracy (the seed's \"action "
        "accuracy\"): the evaluation's own decoding takes the expert's action at the expert's states of the "
        "eval games (the lower-bound check below). Accuracy on visited states: the policy's action = the "
        "expert's at the states the policy itself reaches. Held-out agreement (when the runs set "
        "eval.holdout_states): the same teacher-forced agreement on expert states of training games "
        "no run trains on, at each run's last step. Env failures: episodes lost to an env crash or "
        "hang, over all seeds.",
        "",
        *_cost_table(summary),
    ]
    lines += [
        "",
        "## Lower-bound check per checkpoint",
        "",
        "p_t = pi(expert action | expert state) at T=1 along the expert trajectories of the eval games; "
        "bound = mean over games of prod_t p_t (sampling) or prod_t 1{eval policy = expert} (greedy: the evaluation's deterministic decoding).",
        "",
        "| run | acc on visited states | mean p_t | teacher-forced acc | greedy bound | greedy success | ok | sampled bound | sampled success | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, c = r["bound"], r["bound_check"]
        lines.append(
            f"| {r['run']} | {pct(r['action_accuracy'])} | {num(b['mean_step_prob'], '{:.3f}')} | "
            f"{pct(b['greedy_step_accuracy'])} | {pct(b['bound_greedy'])} | {pct(r['success_rate'])} | "
            f"{'yes' if c['greedy_ok'] else 'NO'} | {num(b['bound_sampled'], '{:.2e}')} | "
            f"{pct(b.get('sampled_success'))} | {'-' if 'sampled_ok' not in c else 'yes' if c['sampled_ok'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_success(results: list[dict], path: Path) -> Path:
    """Success against action accuracy, one point per checkpoint, colored by method: teacher-forced
    (the expert's states of the eval games: the lower-bound check) on the left, on the states the
    policy itself visits on the right."""
    import matplotlib  # lazy: optional plotting dependency, slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    panels = [
        ("teacher-forced (expert's states)", lambda r: (r.get("bound") or {}).get("greedy_step_accuracy")),
        ("on the states the policy visits", lambda r: r["action_accuracy"]),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in results))}
    for ax, (where, acc) in zip(axes, panels):
        for method, color in colors.items():
            rs = [r for r in results if r["method"] == method and acc(r) is not None]
            ax.scatter(
                [acc(r) for r in rs],
                [r["success_rate"] for r in rs],
                color=color,
                label=STAGES[method].method,
            )
        xs = [i / 50 for i in range(51)]
        ax.plot(xs, xs, ":", color="gray", lw=0.8, label="y = x")
        ax.set_xlabel(f"action accuracy vs expert, {where}")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("multi-turn success rate")
    axes[1].legend(fontsize=8)
    fig.suptitle("success vs action accuracy (one point per checkpoint and seed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
