"""SFT's held-out agreement curve: the rows a run logged with eval.holdout_states (trainer/holdout.py),
each paired state by state with a reference checkpoint's agreement on the same held-out states.

    python bench/results/smollm2-135m-cpu/selection/holdout_curve.py --run runs/selection/sft2ep-s0 \
        --reference runs/compare-smollm2-135m-cpu/sft-s0/final \
        --states data/selection/states-train-s100-n60.jsonl --name sft2ep-s0

The reference's per-state matches are computed here, with its own final/policy.json (decoding,
constraints, dtype) and the trainer's code path (`trainer.holdout.agreement_matches`), and cached in
<name>.holdout.json next to this file with the run's rows. Output: <name>.holdout.{json,md} and the
table on stdout. Per row: step, epochs seen (step x batch / episodes), the lr of that step, the mean
SFT loss over the steps since the previous row, agreement with its 95% Wilson interval, and states
only the row gets right / only the reference gets right (exact McNemar p).
"""

import argparse
import json
import time
from pathlib import Path

from singleturn.harness import read_states
from singleturn.model import Tokenizer, load_hf_checkpoint
from singleturn.model.policy import DTYPES, PolicySpec
from singleturn.trainer.holdout import agreement_matches, summarize, trajectories
from singleturn.trainer.metrics import read_metrics
from singleturn.trainer.stats import mcnemar_exact

HERE = Path(__file__).resolve().parent


def reference_matches(final: Path, states: str) -> tuple[str, float]:
    spec = PolicySpec.load(final)
    model, _ = load_hf_checkpoint(final, dtype=DTYPES[spec.dtype])
    policy = spec.policy(model, Tokenizer.from_file(final))
    t0 = time.perf_counter()
    try:
        got = agreement_matches(policy, trajectories(read_states(states), states), spec.batch_size)
    finally:
        policy.close()
    return summarize(got)["matches"], time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run directory whose metrics.jsonl has holdout rows")
    p.add_argument("--reference", required=True, help="an exported final/ to pair every row with")
    p.add_argument("--states", required=True, help="the run's eval.holdout_states")
    p.add_argument("--name", required=True)
    p.add_argument("--episodes", type=int, default=300, help="training episodes (an epoch)")
    args = p.parse_args()
    out = HERE / f"{args.name}.holdout.json"
    cached = json.loads(out.read_text()) if out.exists() else {}
    if cached.get("reference") == args.reference and cached.get("states") == args.states:
        ref, ref_seconds = cached["reference_matches"], cached["reference_seconds"]
    else:
        ref, ref_seconds = reference_matches(Path(args.reference), args.states)
    rows = read_metrics(Path(args.run) / "metrics.jsonl")
    cfg = json.loads((Path(args.run) / "config.json").read_text())
    batch = cfg["sft"]["batch_size"]
    train = {r["step"]: r for r in rows if r.get("kind") == "sft"}
    held = [r for r in rows if r.get("kind") == "holdout"]
    k_ref = ref.count("1")
    lines = [
        f"Held-out teacher-forced agreement of `{args.run}` on {len(ref)} expert states of "
        f"`{args.states}`, paired with `{args.reference}` ({k_ref}/{len(ref)} = {100 * k_ref / len(ref):.1f}%, "
        f"computed in {ref_seconds:.0f} s).",
        "",
        "| step | epochs | lr | mean SFT loss since the previous row | agreement | 95% interval | vs reference: only it / only reference | McNemar p | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    prev = 0
    for r in held:
        losses = [
            train[s]["loss"] for s in range(prev + 1, r["step"] + 1) if s in train and "loss" in train[s]
        ]
        lr = train.get(r["step"], {}).get("lr")
        b = sum(x == "1" and y == "0" for x, y in zip(r["matches"], ref))
        c = sum(x == "0" and y == "1" for x, y in zip(r["matches"], ref))
        lines.append(
            f"| {r['step']} | {r['step'] * batch / args.episodes:.2f} | "
            f"{'-' if lr is None else f'{lr:.2e}'} | "
            f"{sum(losses) / len(losses) if losses else float('nan'):.4f} | {100 * r['agreement']:.1f}% | "
            f"[{100 * r['agreement_lo']:.1f}, {100 * r['agreement_hi']:.1f}] | {b} / {c} | "
            f"{mcnemar_exact(b, c):.2g} | {r['seconds']:.0f} |"
        )
        prev = r["step"]
    table = "\n".join(lines)
    print(table)
    doc = {
        "run": args.run,
        "reference": args.reference,
        "states": args.states,
        "reference_matches": ref,
        "reference_seconds": ref_seconds,
        "rows": held,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    (HERE / f"{args.name}.holdout.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
