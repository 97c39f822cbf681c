"""Ranked vs trie-greedy decoding of a trained episode-format checkpoint, on held-out TRAINING games.

    python bench/decoding_agreement.py --checkpoint runs/smollm2-ep-sft120/final \
        --states data/games/states-train-n300-s0.jsonl --sft-steps 30 --sft-batch 4 [--games 40]
    python bench/decoding_agreement.py --checkpoint <a run trained on every training game>/final \
        --states <expert states of training games kept out of SFT> --sft-steps 0 --sft-batch 1 \
        --games 1000 --dtype bfloat16

Issue "compute each turn once", item 3: the decoding is chosen by agreement with the expert after
SFT, never on the evaluation games. The SFT run's own episodes are excluded exactly: its batches
are a pure function of (step, batch size, episodes, data seed) (`trainer.data.batch_indices`), so
the first `--games` training episodes it never saw are scored. Teacher-forced (the expert's
history), lockstep through `model.EpisodePolicy` as the evaluation plays. Per decoding: agreement
with its 95% Wilson interval, ms and computed tokens per state; and how often the two decodings
pick the same command; and each decoding paired with rank state by state (states only it gets right /
only rank gets right, exact McNemar p). `--dtype` is the weights' dtype (the evaluation's: bfloat16 where
the CPU has avx512_bf16). Output: decoding_agreement.jsonl + .md (default bench/results/).
"""

from __future__ import annotations

import time

import torch
from _common import base_parser, env_info, write_jsonl, write_markdown

from singleturn.harness import read_states
from singleturn.model.episode_policy import EpisodePolicy
from singleturn.model.hf_io import load_hf_checkpoint
from singleturn.model.tokenizer import Tokenizer
from singleturn.trainer.data import batch_indices
from singleturn.trainer.episode_data import build_episode_examples
from singleturn.trainer.holdout import teacher_forced_actions
from singleturn.trainer.stats import mcnemar_exact, wilson_interval

COLUMNS = [
    ("decoding", "decoding"),
    ("states", "held-out states"),
    ("agreement", "agreement"),
    ("wilson95", "95% interval"),
    ("same_as_rank", "same pick as rank"),
    ("vs_rank", "vs rank: only it right / only rank right"),
    ("mcnemar_p", "McNemar p"),
    ("ms_per_state", "ms / state"),
    ("tokens_per_state", "tokens / state"),
]


def unseen_episodes(episodes: list, *, steps: int, batch: int, seed: int) -> list:
    """The episodes an SFT run of `steps` x `batch` whole episodes (data seed `seed`) never drew."""
    seen = {j for i in range(steps) for j in batch_indices(i, batch, len(episodes), seed)}
    return [e for j, e in enumerate(episodes) if j not in seen]


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="an exported HF directory (a run's final/)")
    p.add_argument("--states", required=True)
    p.add_argument(
        "--sft-steps", type=int, required=True, help="the SFT run's steps (its episodes are excluded)"
    )
    p.add_argument("--sft-batch", type=int, required=True, help="the SFT run's episodes per step")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--games", type=int, default=40, help="how many unseen training episodes to score")
    p.add_argument("--decodings", nargs="+", default=["rank", "greedy"], choices=["rank", "greedy"])
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (accepted like every bench)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_file(f"{args.checkpoint}/tokenizer.json")
    model, _ = load_hf_checkpoint(args.checkpoint, dtype=getattr(torch, args.dtype))
    model.eval()
    # The trainer's episode list, built as trainer/train.py builds it (same order, same drops).
    episodes, _, _ = build_episode_examples(
        read_states(args.states),
        tok,
        list_admissible=False,
        system_prompt=False,
        max_seq_len=model.config.max_seq_len,
    )
    unseen = unseen_episodes(episodes, steps=args.sft_steps, batch=args.sft_batch, seed=args.data_seed)
    held = {str(e.states[0]["game"]): e.states for e in unseen[: args.games]}
    states = [s for g in held for s in held[g]]
    print(
        f"[agreement] {len(unseen)} of {len(episodes)} episodes unseen by SFT; scoring {len(held)} "
        f"({len(states)} states)",
        flush=True,
    )
    rows, picks = [], {}
    for decoding in args.decodings:
        policy = EpisodePolicy(
            model,
            tok,
            decoding=decoding,
            max_episodes=args.eval_batch,
            max_len=model.config.max_seq_len,
            list_admissible=False,
        )
        t0 = time.perf_counter()
        with torch.no_grad():
            picks[decoding] = teacher_forced_actions(policy, held, args.eval_batch)
        dt = time.perf_counter() - t0
        tokens = policy.cache.computed_tokens
        policy.close()
        k = sum(c == s["expert_action"] for c, s in zip(picks[decoding], states))
        lo, hi = wilson_interval(k, len(states))
        same = vs_rank = p_value = None
        if "rank" in picks:
            same = sum(a == b for a, b in zip(picks["rank"], picks[decoding])) / len(states)
            right = [[c == s["expert_action"] for c, s in zip(picks[d], states)] for d in ("rank", decoding)]
            only_it = sum(b and not a for a, b in zip(*right))
            only_rank = sum(a and not b for a, b in zip(*right))
            vs_rank, p_value = f"{only_it} / {only_rank}", mcnemar_exact(only_it, only_rank)
        rows.append(
            {
                "topic": "decoding_agreement",
                "checkpoint": args.checkpoint,
                "decoding": decoding,
                "games": len(held),
                "states": len(states),
                "agreement": k / len(states),
                "wilson95": f"[{lo:.3f}, {hi:.3f}]",
                "same_as_rank": same,
                "vs_rank": vs_rank,
                "mcnemar_p": p_value,
                "ms_per_state": 1e3 * dt / len(states),
                "tokens_per_state": tokens / len(states),
                "threads": args.threads,
                "dtype": args.dtype,
                **env_info(),
            }
        )
        print(
            f"[agreement] {decoding}: {k}/{len(states)} = {k / len(states):.3f} [{lo:.3f}, {hi:.3f}], "
            f"{rows[-1]['ms_per_state']:.0f} ms/state",
            flush=True,
        )
    write_jsonl(args.out_dir, "decoding_agreement", rows)
    write_markdown(
        args.out_dir,
        "decoding_agreement",
        "Ranked vs trie-greedy decoding after SFT, held-out training games",
        rows,
        COLUMNS,
    )


if __name__ == "__main__":
    main()
