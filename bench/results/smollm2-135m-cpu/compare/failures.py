"""Where a policy's lost episodes stop: what the agent did of its task by the step limit.

    python bench/results/smollm2-135m-cpu/compare/failures.py sft-s0.json sft-s1.json [...]

Reads evaluation reports (episodes with their actions). The task's object and receptacle come from
the game's directory name (`<task>-<Object>-<Sliced>-<Receptacle>-<scene>`). Categories, in order: never
took anything; took only other objects; took the right object but never did the task's
clean / heat / cool step; a look task that never used a lamp; took it and still did not finish (the
placing, or the second object). Also: lost at the step limit, and lost while looping (one action 3+
times in the last 10 steps).
"""

import collections
import json
import sys


def main(paths: list[str]) -> None:
    eps = [e for p in paths for e in json.load(open(p))["episodes"]]
    lost = [e for e in eps if not e["won"]]
    cats: collections.Counter = collections.Counter()
    for e in lost:
        task, obj = e["game"].split("/")[-3].split("-")[:2]
        acts = e["actions"]
        takes = [a.split()[1] for a in acts if a.startswith("take ")]
        step = next((v for v in ("clean", "heat", "cool") if f"_{v}_" in task), None)
        if not takes:
            cats["never took anything"] += 1
        elif obj.lower() not in takes:
            cats["took only other objects"] += 1
        elif step and not any(a.startswith(step) for a in acts):
            cats["took the right object, never the clean / heat / cool step"] += 1
        elif task.startswith("look_at") and not any(a.startswith("use ") for a in acts):
            cats["took the right object, never used a lamp"] += 1
        else:
            cats["took the right object, did not finish (placing, second object)"] += 1
    loops = sum(max(collections.Counter(e["actions"][-10:]).values()) >= 3 for e in lost)
    at_limit = sum(e["steps"] >= max(x["steps"] for x in eps) for e in lost)
    print(f"{len(eps)} episodes, {len(lost)} lost: {at_limit} at the step limit, {loops} looping")
    for k, v in cats.most_common():
        print(f"  {k}: {v} ({100 * v / len(lost):.0f}%)")


if __name__ == "__main__":
    main(sys.argv[1:])
