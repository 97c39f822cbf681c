"""Where a real evaluation's model time goes: `python -m singleturn.harness evaluate ...` with every
`EpisodeCache` forward timed.

    python bench/profile_eval.py --profile-out runs/x.profile.jsonl evaluate --games DIR --policy CKPT --out runs/x

Each `append` and `score` call of the lockstep batch writes one JSONL row: the rows in the batched
block (B), the longest row's tokens (T: what the block pads to before any split), the real tokens,
the live rows, the longest row's cached length (kv) and the seconds. At the end it prints, per
operation, the calls, seconds, padded (B x T) against real tokens, and seconds per real token. A
score's real tokens are its trie's nodes, leaves included (the engine computes only the inner ones:
the per-token cost stays comparable across versions); B x T is what the padded engine computes
(the GPU default); the packed one (CPU) pads nothing.
"""

from __future__ import annotations

import json
import sys
import time

import singleturn.model.episode_cache as ec
from singleturn.harness.__main__ import main as harness_main
from singleturn.model.generate import _token_trie


def _instrument(out) -> None:
    append, score = ec.EpisodeCache.append, ec.EpisodeCache.score

    def row(op, cache, sizes, seconds):
        live = [r for r, n in enumerate(sizes) if n]
        if live:
            B = max(live) + 1
            kv = max(cache.lengths[:B])
            rec = {
                "op": op,
                "B": B,
                "T": max(sizes),
                "real": sum(sizes),
                "live": len(live),
                "kv": kv,
                "s": seconds,
            }
            out.write(json.dumps(rec) + "\n")

    def timed_append(self, new_tokens):
        t0 = time.perf_counter()
        append(self, new_tokens)
        row("append", self, [len(t) for t in new_tokens], time.perf_counter() - t0)

    def timed_score(self, candidates, suffix=None):
        t0 = time.perf_counter()
        got = score(self, candidates, suffix)
        seconds = time.perf_counter() - t0
        pre = suffix or [[] for _ in candidates]
        sizes = [
            len(_token_trie([list(p) + list(c) for c in cs]).tokens) if cs else 0
            for p, cs in zip(pre, candidates)
        ]
        row("score", self, sizes, seconds)
        return got

    ec.EpisodeCache.append, ec.EpisodeCache.score = timed_append, timed_score


def summarize(path: str) -> list[str]:
    rows = [json.loads(line) for line in open(path)]
    lines = []
    for op in ("append", "score"):
        r = [x for x in rows if x["op"] == op]
        if not r:
            continue
        s, padded, real = sum(x["s"] for x in r), sum(x["B"] * x["T"] for x in r), sum(x["real"] for x in r)
        lines.append(
            f"{op}: {len(r)} calls, {s:.1f} s, {real} real tokens, {padded} padded to the longest row "
            f"({padded / real:.2f}x), {1e3 * s / real:.2f} ms per real token, mean kv {sum(x['kv'] for x in r) / len(r):.0f}"
        )
    return lines


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "--profile-out":
        print(__doc__, file=sys.stderr)
        return 2
    path = argv[1]
    with open(path, "w") as out:
        _instrument(out)
        rc = harness_main(argv[2:])
    print("\n".join(summarize(path)), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
