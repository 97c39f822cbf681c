"""The selection games' table: each policy's wins on the 60 games, its Wilson interval, visited-state
accuracy, and wins / losses against SFT seed 0 on the same games (exact McNemar p).

    python bench/results/smollm2-135m-cpu/selection/summarize.py [--base sft-s0]

Reads the evaluation reports next to this file (`<name>.json`, written by bench/profile_eval.py).
"""

import argparse
import json
from pathlib import Path

from singleturn.trainer.stats import mcnemar_exact, wilson_interval

HERE = Path(__file__).resolve().parent
ORDER = ["sft-s0", "sft-s0-packed", "grpo-lr1e-5", "grpo-lr2e-6", "grpo-kl0.05", "grpo-advnone"]
ORDER += ["sftcont-lr1e-5", "sftcont-lr1e-12", "grpo-warm", "sftcont-warm", "sft-s0-greedy"]
ORDER += ["sft-s0-fp32", "sftcont-warm-fp32", "grpo-warm-fp32", "ppo-s0", "grpo-multiturn-s0"]
ORDER += ["sft2ep-s0", "grpo-from-sft2ep-s0", "sft3ep-s0"]


def load(name: str) -> tuple[dict, dict]:
    doc = json.loads((HERE / f"{name}.json").read_text())
    return doc, {e["game"].split("/")[-2]: e for e in doc["episodes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="sft-s0-packed", help="the policy the others are paired with")
    args = p.parse_args()
    _, base = load(args.base)
    print(
        "| policy | won / 60 | 95% interval | visited-state accuracy | vs SFT: wins / losses | McNemar p | eval wall-clock |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in (n for n in ORDER if (HERE / f"{n}.json").exists()):
        doc, ep = load(name)
        won = sum(e["won"] for e in ep.values())
        lo, hi = wilson_interval(won, len(ep))
        wins = sum(ep[g]["won"] and not base[g]["won"] for g in ep)
        losses = sum(base[g]["won"] and not ep[g]["won"] for g in ep)
        p_value = "-" if name == args.base else f"{mcnemar_exact(wins, losses):.2g}"
        print(
            f"| {name} | {won}/{len(ep)} = {100 * won / len(ep):.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | "
            f"{100 * doc['action_accuracy']:.1f}% | {wins} / {losses} | {p_value} | {doc['meta']['seconds']:.0f} s |"
        )


if __name__ == "__main__":
    main()
