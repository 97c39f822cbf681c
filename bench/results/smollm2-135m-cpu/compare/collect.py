"""Copy the comparison's finished pieces from its run directory into this folder (what gets committed).

    python bench/results/smollm2-135m-cpu/compare/collect.py [--runs runs/compare-smollm2-135m-cpu] [--to DIR]

Per finished run (final/ and eval/<method>.json exist): <run>.json (its evaluation), <run>.md (its
table), <run>.metrics.jsonl, <run>.timings.json, and <run>.bound.json when its lower-bound check ran;
the driver's latest comparison.md (partial until every run is done) and its plot. Never weights. A
piece already here is kept (earlier sessions' copies stay as committed) unless --update.
"""

import argparse
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/compare-smollm2-135m-cpu")
    p.add_argument("--update", action="store_true", help="overwrite the pieces already here")
    p.add_argument("--to", default=str(HERE), help="where the pieces go (default: this folder)")
    args = p.parse_args()
    root, to = Path(args.runs), Path(args.to)
    to.mkdir(parents=True, exist_ok=True)
    for run in sorted(d for d in root.iterdir() if d.is_dir() and (d / "final" / "config.json").exists()):
        method = run.name.rsplit("-s", 1)[0]
        pieces = {
            f"eval/{method}.json": f"{run.name}.json",
            f"eval/{method}.md": f"{run.name}.md",
            "metrics.jsonl": f"{run.name}.metrics.jsonl",
            "timings.json": f"{run.name}.timings.json",
            "eval/bound.json": f"{run.name}.bound.json",
        }
        if not (run / "eval" / f"{method}.json").exists():
            continue
        copied = []
        for src, dst in pieces.items():
            if (run / src).exists() and (args.update or not (to / dst).exists()):
                shutil.copyfile(run / src, to / dst)
                copied.append(dst)
        print(f"{run.name}: {', '.join(copied) or 'nothing new'}")
    for name in ("comparison.md", "plots/accuracy_vs_success.png"):
        if (root / name).exists():
            shutil.copyfile(root / name, to / Path(name).name)
            print(name)


if __name__ == "__main__":
    main()
