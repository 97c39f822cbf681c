"""Evaluation's model cost per episode-step: today's per-state re-encoding vs the episode cache.

    python bench/bench_episodes.py [--preset smollm2-135m] [--episodes 16] [--turns 8] [--spread 900] [--quick | --cpu-smoke]

Both paths rank the same candidates with the same model (random weights of a preset: the cost does
not depend on them) over synthetic episodes whose token counts are the ones measured on the 4,994
expert states of `make train`'s games with SmolLM2's tokenizer (issue "compute each turn once"): a
first user message of 120 tokens (goal + first observation), then per turn an observation of 24
tokens + 10 of chat template, an action of 5 + 2, the admissible list of 153 tokens, and 25
candidate commands of 5 tokens sharing prefixes (a trie of ~90 nodes); today's prompt (window of 2
turns + memory lines + observation + admissible list) is 370 tokens at every turn.

- `per-state`: every turn, `score_continuations` over [today's 370-token prompt | the trie] per episode.
- `episode-cache`: `EpisodeCache`: per turn, append what the turn adds, then score the trie on top;
  `suffix=admissible` scores it after this turn's admissible list (computed per turn, then dropped),
  `suffix=none` without it (the list's value to a trained model is to be measured, not assumed).
- `episode-cache, greedy`: `EpisodeCache.greedy`: per turn, append what the turn adds, then decode one
  candidate under the trie (one batched forward per branching point); the decoded ids are then
  truncated and the turn's chosen ids appended (pessimistic: `EpisodePolicy` keeps them when they agree).
Each episode-cache path runs in both engine modes: `padded` (one forward over every row, padded to
the longest row's tokens and attending the longest row's cache; the default on GPUs) and `packed`
(the CPU default: every row's tokens in one sequence without padding, the matmuls over all of them,
the attention row by row over each row's own length). A real lockstep evaluation holds episodes at different turns (a
finished episode's row restarts with a new one): `--spread` gives row r a history of
PROMPT0 + spread x r / (episodes - 1) tokens before the timed turns (default 900: rows of 120 to
1,020 tokens, the longest like the longest row of a real SmolLM2 evaluation, 1,041 tokens on average
over its score calls; bench/results/smollm2-135m-cpu/selection/). `--spread 0` is the aligned case.
Reported per episode-step: tokens through the model and wall time (median over turns, all episodes
in one batch), and the ratio to per-state, side by side in one process. Output: episodes.jsonl + .md.
"""

from __future__ import annotations

import random
import time

import torch
from _common import base_parser, env_info, write_jsonl, write_markdown

from singleturn.model import LlamaConfig, Transformer
from singleturn.model.episode_cache import EpisodeCache
from singleturn.model.generate import score_continuations

PROMPT0, OBS, TEMPLATE, ACTION, ACTION_END, ADMISSIBLE, TODAY_PROMPT = 120, 24, 10, 5, 2, 153, 370
N_CANDS, VERBS = 25, 6
COLUMNS = [
    ("preset", "model"),
    ("dtype", "dtype"),
    ("threads", "threads"),
    ("episodes", "episodes"),
    ("spread", "history spread"),
    ("path", "path"),
    ("tokens_per_step", "tokens / episode-step"),
    ("ms_per_step", "ms / episode-step (median)"),
    ("token_ratio", "tokens vs per-state"),
    ("speedup", "speed-up vs per-state"),
    ("max_score_diff", "max |score diff|"),
]


def _ids(rng, n, V):
    return [rng.randrange(3, V) for _ in range(n)]


def _candidates(rng, V):
    verbs = [_ids(rng, 2, V) for _ in range(VERBS)]  # "go to", "take", ... share their first tokens
    return [list(rng.choice(verbs)) + _ids(rng, ACTION - 2, V) + [2] for _ in range(N_CANDS)]


PATHS = [("per-state", "per-state")] + [
    (f"{name}/{mode}", f"episode-cache {mode}, {label}")
    for mode in ("padded", "packed")
    for name, label in (("admissible", "suffix=admissible"), ("none", "suffix=none"), ("greedy", "greedy"))
]


def run_preset(
    preset: str, episodes: int, turns: int, dtype: torch.dtype, device: str, spread: int, seed: int = 0
) -> list[dict]:
    config = LlamaConfig.from_preset(preset)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(seed)
    model = model.to(device=device, dtype=dtype).eval()
    V = config.vocab_size
    rng = random.Random(seed)
    history = [PROMPT0 + spread * r // max(1, episodes - 1) for r in range(episodes)]
    eps = [{"seq": _ids(rng, n, V)} for n in history]
    max_len = max(history) + turns * (OBS + TEMPLATE + ACTION + ACTION_END) + ADMISSIBLE + 200
    caches = {
        path: EpisodeCache(model, episodes, max_len, dtype=dtype, packed=path.endswith("packed"))
        for path, _ in PATHS[1:]
    }
    for c in caches.values():
        c.append([e["seq"] for e in eps])
    times: dict[str, list[float]] = {path: [] for path, _ in PATHS}
    tokens: dict[str, int] = {k: 0 for k in times}
    max_diff: dict[str, float] = {}  # measured for suffix=none (the cache-free path has no suffix)
    with torch.inference_mode():
        for _ in range(turns):
            cands = [_candidates(rng, V) for _ in eps]
            admissible = [_ids(rng, ADMISSIBLE, V) for _ in eps]
            today = [_ids(rng, TODAY_PROMPT, V) for _ in eps]
            t0 = time.perf_counter()
            score_continuations(model, today, cands)
            times["per-state"].append(time.perf_counter() - t0)
            tokens["per-state"] += sum(
                TODAY_PROMPT + len({tuple(c[: k + 1]) for c in cs for k in range(len(c))}) for cs in cands
            )
            for path, cache in caches.items():
                name = path.split("/")[0]
                before = cache.computed_tokens
                t0 = time.perf_counter()
                if name == "greedy":
                    lengths = list(cache.lengths)
                    cache.greedy(cands)
                    for r, n in enumerate(lengths):
                        cache.truncate(r, n)
                    times[path].append(time.perf_counter() - t0)
                    tokens[path] += cache.computed_tokens - before
                    continue
                got = cache.score(cands, suffix=admissible if name == "admissible" else None)
                times[path].append(time.perf_counter() - t0)
                tokens[path] += cache.computed_tokens - before
                if name == "none" and _ == 0:  # the cached scores are the cache-free ones (first, last row)
                    ends = [0, episodes - 1]
                    ref = score_continuations(model, [eps[r]["seq"] for r in ends], [cands[r] for r in ends])
                    max_diff[path] = max(abs(a - b) for r, w in zip(ends, ref) for a, b in zip(got[r], w))
            new = [c[0] + _ids(rng, OBS + TEMPLATE, V) for c in cands]  # the chosen action, the next turn
            for path, cache in caches.items():
                before = cache.computed_tokens
                t0 = time.perf_counter()
                cache.append(new)
                times[path][-1] += time.perf_counter() - t0
                tokens[path] += cache.computed_tokens - before
            for e, n in zip(eps, new):
                e["seq"] += n
    steps = episodes * turns
    env = env_info()
    rows = []
    base_ms = sorted(times["per-state"])[turns // 2] * 1e3 / episodes
    for path, label in PATHS:
        ms = sorted(times[path])[turns // 2] * 1e3 / episodes
        rows.append(
            {
                "topic": "episodes",
                "preset": preset,
                "dtype": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
                "episodes": episodes,
                "turns": turns,
                "spread": spread,
                "path": label,
                "tokens_per_step": tokens[path] / steps,
                "ms_per_step": ms,
                "token_ratio": tokens["per-state"] / tokens[path],
                "speedup": base_ms / ms,
                "max_score_diff": max_diff.get(path),
                **env,
            }
        )
        print(
            f"[episodes] {preset} {label:42s} {tokens[path] / steps:7.1f} tokens/step {ms:9.1f} ms/step "
            f"x{base_ms / ms:.2f}",
            flush=True,
        )
    for c in caches.values():
        c.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--preset", nargs="+", default=None, help="model presets (default: tiny smollm2-135m)")
    p.add_argument("--episodes", type=int, default=None, help="episodes in lockstep (default 16)")
    p.add_argument("--turns", type=int, default=None, help="turns timed per episode (default 8)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on CUDA")
    p.add_argument(
        "--spread", type=int, default=None, help="history tokens spread over the rows (default 900)"
    )
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    presets = args.preset or (["tiny"] if smoke else ["tiny", "smollm2-135m"])
    episodes = args.episodes or (2 if smoke else (4 if args.quick else 16))
    turns = args.turns or (2 if smoke else (3 if args.quick else 8))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if torch.cuda.is_available() and not smoke else "float32")
    ]
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    spread = args.spread if args.spread is not None else (40 if smoke else 900)
    rows = [r for preset in presets for r in run_preset(preset, episodes, turns, dtype, device, spread)]
    write_jsonl(args.out_dir, "episodes", rows)
    write_markdown(
        args.out_dir,
        "episodes",
        "Evaluation's model cost per episode-step: per-state vs episode cache",
        rows,
        COLUMNS,
    )


if __name__ == "__main__":
    main()
