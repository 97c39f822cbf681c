"""Success against teacher-forced action accuracy for every run of both SmolLM2 comparisons (the 1-epoch
and the 3-epoch SFT start) on one plot, from the committed per-run results alone.

    python bench/results/smollm2-135m-cpu/compare/both_starts.py

Reads `<run>.json` (the evaluation: success_rate, action_accuracy on visited states) and
`<run>.bound.json` (the lower-bound check: greedy_step_accuracy, the teacher-forced accuracy on the eval
games' expert states) of the 10 runs in `compare/` and `compare-sft3ep/`; prints one row per run and
writes `compare-sft3ep/accuracy_vs_success_both_starts.png`: color = method, marker = SFT start.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STARTS = {"SFT 1 epoch": HERE, "SFT 3 epochs": HERE.parent / "compare-sft3ep"}
METHODS = {
    "sft": "SFT",
    "grpo": "single-turn GRPO",
    "ppo": "PPO",
    "grpo-multiturn": "trajectory GRPO",
    "grpo-dagger": "grpo-dagger",
}
SEEDS = (0, 1)


def load() -> list[dict]:
    rows = []
    for start, d in STARTS.items():
        for method in METHODS:
            for seed in SEEDS:
                run = f"{method}-s{seed}"
                ev = d / f"{run}.json"
                bd = d / f"{run}.bound.json"
                if not ev.exists() or not bd.exists():
                    sys.exit(f"both_starts: missing {ev.name} or {bd.name} in {d}")
                e, b = json.loads(ev.read_text()), json.loads(bd.read_text())
                rows.append(
                    {
                        "start": start,
                        "method": method,
                        "run": run,
                        "success": e["success_rate"],
                        "visited": e["action_accuracy"],
                        "teacher_forced": b["greedy_step_accuracy"],
                    }
                )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # lazy: optional plotting dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    markers = dict(zip(STARTS, ("o", "^")))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    panels = [
        ("teacher_forced", "teacher-forced (expert's states)"),
        ("visited", "on the states the policy visits"),
    ]
    for ax, (key, where) in zip(axes, panels):
        for r in rows:
            ax.scatter(r[key], r["success"], color=colors[r["method"]], marker=markers[r["start"]], s=36)
        ax.set_xlabel(f"action accuracy vs expert, {where}")
        ax.grid(alpha=0.3)
    for m, c in colors.items():
        axes[1].scatter([], [], color=c, label=METHODS[m])
    for s, mk in markers.items():
        axes[1].scatter([], [], color="gray", marker=mk, label=s)
    axes[0].set_ylabel("multi-turn success (100 held-out episodes)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("SmolLM2-135M: success vs action accuracy, one point per run (method x seed x SFT start)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    rows = load()
    print("| SFT start | run | success | teacher-forced acc | acc on visited states |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['start']} | {r['run']} | {100 * r['success']:.0f}% | {100 * r['teacher_forced']:.1f}% "
            f"| {100 * r['visited']:.1f}% |"
        )
    out = STARTS["SFT 3 epochs"] / "accuracy_vs_success_both_starts.png"
    plot(rows, out)
    print(f"wrote {out.relative_to(HERE.parents[3])}")


if __name__ == "__main__":
    main()
