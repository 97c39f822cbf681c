"""The README's lead table from a comparison's comparison.json (the driver's own summary).

    python bench/results/smollm2-135m-cpu/compare/readme_table.py runs/compare-smollm2-135m-cpu-sft3ep/comparison.json

One row per method: success pooled over seeds with its 95% Wilson interval, per seed, seen / unseen,
paired wins / losses against SFT (McNemar p), held-out agreement, teacher-forced accuracy on the eval
games' expert states, accuracy on visited states, samples / env steps and training seconds (means
over seeds). Numbers only as the driver computed them; a missing measure prints "-".
"""

import json
import sys

NAMES = {
    "zero-shot": "zero-shot",
    "sft": "SFT",
    "grpo": "+ single-turn GRPO (the paper)",
    "ppo": "+ PPO (multi-turn, value head, GAE)",
    "grpo-multiturn": "+ trajectory GRPO (multi-turn)",
    "grpo-dagger": "+ grpo-dagger (single-turn + own states)",
}


def _mean(xs) -> float | None:
    return xs[0] if xs else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _count(s: dict) -> str:
    return f"{s['successes']}/{s['episodes']}"


def row(method: str, s: dict) -> str:
    allsplit = s["success"]["all"]
    lo, hi = allsplit["ci95"]
    seeds = " / ".join(str(v["successes"]) for _, v in sorted(allsplit["per_seed"].items()))
    split = " / ".join(str(s["success"][k]["successes"]) for k in ("valid_seen", "valid_unseen"))
    vs = s.get("vs_sft", {}).get("all")
    vs_txt = "-" if not vs else f"{vs['wins']} / {vs['losses']} ({vs['p']:.2g})"
    won = f"{_count(allsplit)} = {100 * allsplit['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    won = f"**{won}**" if method in ("sft", "grpo") else won
    ho = _mean(s.get("holdout_agreement"))
    tf = _mean(s.get("teacher_forced_accuracy"))
    cost = "-"
    if method not in ("zero-shot", "sft"):
        cost = f"{s['samples'][0]:,.0f} / {s['env_steps'][0]:,.0f}"
    train = "-" if method == "zero-shot" else f"{s['train_seconds'][0]:,.0f}"
    cells = [NAMES.get(method, method), won, seeds, split, vs_txt, _pct(ho or None), _pct(tf or None)]
    cells += [_pct(s["action_accuracy"][0]), cost, train]
    return "| " + " | ".join(cells) + " |"


def main(path: str) -> None:
    d = json.load(open(path))
    head = [
        "policy",
        "success, pooled over seeds [95% Wilson]",
        "per seed",
        "seen / unseen",
        "vs SFT, same seed: wins / losses (McNemar p)",
        "held-out agreement",
        "teacher-forced acc",
        "acc on visited states",
        "samples / env steps (mean per seed)",
        "train s (mean per seed)",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for method, s in d["summary"].items():
        print(row(method, s))
    pending = d["meta"].get("pending") or []
    if pending:
        print(f"\nPartial: {len(pending)} run(s) still to come: {', '.join(pending)}")


if __name__ == "__main__":
    main(sys.argv[1])
