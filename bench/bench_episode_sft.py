"""SFT's cost per expert state: today's per-state prompts vs whole episodes as token trees.

    python bench/bench_episode_sft.py --model data/models/SmolLM2-135M-Instruct \
        --states data/games/states-train-n300-s0.jsonl [--episodes 6] [--reps 2]

The same expert episodes (a seeded sample of `--episodes` of the states file's episodes), the same
model and one SFT forward + backward over all their states (`trainer.stages.sft.sft_forward_backward`,
fp32, the losses checked equal between the episode paths), four ways, side by side in one process:
- `window, per state`: today's default prompt (harness.render_prompt, history 2 + memory lines +
  admissible list, no system message), each state its own right-padded row (micro-batches of 8);
- `episode, per state`: the append-only episode prompt, each state its own copy of its prefix (the
  reference the tree must equal);
- `episode tree, no list`: one causal sequence per episode, the loss on every action (no mask);
- `episode tree, list`: the trunk once + each turn's admissible list as a branch (tree mask).
Reported: tokens computed per state (padding included) and wall time per state (median of --reps),
the ratio to `window, per state`, and the extrapolation to one epoch over every state of the file.
Output: episode_sft.jsonl + .md (default bench/results/).
"""

from __future__ import annotations

import random
import statistics
import time

import torch
from _common import base_parser, env_info, write_jsonl, write_markdown

from singleturn.harness import read_states
from singleturn.model.hf_io import load_hf_checkpoint
from singleturn.model.tokenizer import Tokenizer
from singleturn.trainer.data import build_examples
from singleturn.trainer.episode_data import build_episode_examples, episode_states
from singleturn.trainer.stages.sft import _micro_batches, sft_forward_backward

COLUMNS = [
    ("path", "path"),
    ("states", "states"),
    ("tokens_per_state", "tokens / state (computed)"),
    ("ms_per_state", "ms / state (median)"),
    ("token_ratio", "tokens vs window"),
    ("speedup", "speed-up vs window"),
    ("epoch_minutes", "epoch (min, extrapolated)"),
    ("loss", "loss"),
]


def _computed(examples, **kw) -> int:
    return sum(int(p.tokens.numel()) for p, _ in _micro_batches(examples, **kw))


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--states", required=True)
    p.add_argument("--episodes", type=int, default=6)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=4096, help="computed tokens per micro-batch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_hf_checkpoint(args.model, dtype=torch.float32)
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    all_states = read_states(args.states)
    episodes = episode_states(all_states)
    sample = random.Random(0).sample(episodes, min(args.episodes, len(episodes)))
    states = [s for ep in sample for s in ep]
    n = len(states)
    window, _ = build_examples(states, tok, history_window=2, system_prompt=False, max_seq_len=8192)
    tree_nolist, per_state, _ = build_episode_examples(
        states, tok, list_admissible=False, system_prompt=False, max_seq_len=8192
    )
    tree_list, _, _ = build_episode_examples(
        states, tok, list_admissible=True, system_prompt=False, max_seq_len=8192
    )
    kw = dict(micro_batch_size=8, packing=False, max_tokens=args.max_tokens, row_len=2048, device="cpu")
    paths = {
        "window, per state": window,
        "episode, per state": per_state,
        "episode tree, no list": tree_nolist,
        "episode tree, list": tree_list,
    }
    env = env_info()
    rows, base = [], None
    for label, examples in paths.items():
        times, loss = [], None
        for _ in range(args.reps):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            stats = sft_forward_backward(
                model,
                lambda: model.output.weight,
                examples,
                device="cpu",
                **{k: kw[k] for k in ("micro_batch_size", "packing", "max_tokens", "row_len")},
            )
            times.append(time.perf_counter() - t0)
            loss = stats["loss"]
        ms = statistics.median(times) * 1e3 / n
        tokens = _computed(examples, **kw) / n
        base = base or (tokens, ms)
        rows.append(
            {
                "topic": "episode_sft",
                "path": label,
                "states": n,
                "episodes": len(sample),
                "tokens_per_state": round(tokens, 1),
                "ms_per_state": round(ms, 1),
                "token_ratio": round(base[0] / tokens, 2),
                "speedup": round(base[1] / ms, 2),
                "epoch_minutes": round(ms * len(all_states) / 6e4, 1),
                "loss": round(loss, 5),
                "threads": args.threads,
                "dtype": "float32",
                **env,
            }
        )
        print(
            f"[episode_sft] {label:24s} {tokens:7.1f} tokens/state {ms:8.1f} ms/state x{base[1] / ms:.2f} "
            f"loss {loss:.5f}",
            flush=True,
        )
    write_jsonl(args.out_dir, "episode_sft", rows)
    write_markdown(
        args.out_dir,
        "episode_sft",
        "SFT cost per expert state: per-state prompts vs episode token trees",
        rows,
        COLUMNS,
    )


if __name__ == "__main__":
    main()
