"""Teacher-forced agreement of exported checkpoints on the selection games' expert states, each paired
state by state with the first one (exact McNemar p): how much of a multi-turn change shows per step.

    python bench/results/smollm2-135m-cpu/selection/tf_agreement.py \
        --states data/selection/states-train-s100-n60.jsonl \
        sft-s0=runs/compare-smollm2-135m-cpu/sft-s0/final grpo-s0=runs/compare-smollm2-135m-cpu/grpo-s0/final

Each checkpoint plays with its own final/policy.json (decoding, constraints, dtype) through the
trainer's code path (`trainer.holdout.agreement_matches`). Results are cached per name in
tf-agreement.json next to this file (a name already there with the same path is not recomputed);
tf-agreement.md is the table.
"""

import argparse
import json
from pathlib import Path

from holdout_curve import reference_matches

from singleturn.trainer.stats import mcnemar_exact, wilson_interval

HERE = Path(__file__).resolve().parent
OUT = HERE / "tf-agreement.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--states", required=True)
    p.add_argument("checkpoints", nargs="+", help="name=path/to/final; the first is the base")
    args = p.parse_args()
    doc = json.loads(OUT.read_text()) if OUT.exists() else {}
    pairs = [c.split("=", 1) for c in args.checkpoints]
    for name, path in pairs:
        have = doc.get(name, {})
        if have.get("path") != path or have.get("states") != args.states:
            matches, seconds = reference_matches(Path(path), args.states)
            doc[name] = {"path": path, "states": args.states, "matches": matches, "seconds": seconds}
            OUT.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"[agreement] {name}: {matches.count('1')}/{len(matches)} ({seconds:.0f} s)", flush=True)
    base = doc[pairs[0][0]]["matches"]
    lines = [
        f"Teacher-forced agreement on the {len(base)} expert states of `{args.states}`, paired with "
        f"`{pairs[0][0]}` (only this one right / only the base right, exact McNemar p).",
        "",
        "| checkpoint | agreement | 95% interval | vs base | McNemar p | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, _ in pairs:
        m = doc[name]["matches"]
        k = m.count("1")
        lo, hi = wilson_interval(k, len(m))
        b = sum(x == "1" and y == "0" for x, y in zip(m, base))
        c = sum(x == "0" and y == "1" for x, y in zip(m, base))
        lines.append(
            f"| {name} | {k}/{len(m)} = {100 * k / len(m):.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | "
            f"{b} / {c} | {mcnemar_exact(b, c):.2g} | {doc[name]['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    (HERE / "tf-agreement.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
