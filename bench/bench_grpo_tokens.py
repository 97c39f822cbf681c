"""Tokens a single-turn GRPO step computes: window prompts vs the episode format's trunk.

    python bench/bench_grpo_tokens.py --tokenizer data/models/SmolLM2-135M-Instruct/tokenizer.json \
        --states data/games/states-train-n300-s0.jsonl [--steps 20]

Counts only (no model): the micro-batches `trainer.policy_loss.micro_batches` builds for a step of
16 expert states x G 8 responses of 8 tokens, over the first --steps steps of the trainer's own
sampling (seed 0), median per step:
- window prompt, one shared-prefix segment per group (today's default: `grpo.shared_prefix`);
- episode prompt, one segment per group (states drawn at random);
- episode prompt, prefix chains (`Layout.prefix_chains`) over states drawn at random;
- episode prompt, prefix chains over states drawn episode by episode (what the trainer does in the
  episode format: a batch's prompts extend one another, each episode's trunk computed once).
And the rollout's prefill per step: every prompt of the step prefilled on its own (before) against
`model.generate`'s trunks (a prompt that is a prefix of another prompt of the call is not prefilled).
Output: grpo_tokens.jsonl + .md (default bench/results/).
"""

from __future__ import annotations

import statistics

import torch
from _common import base_parser, env_info, write_jsonl, write_markdown

from singleturn.harness import read_states
from singleturn.model.generate import _trunks
from singleturn.model.tokenizer import Tokenizer
from singleturn.trainer.data import batch_indices, build_examples
from singleturn.trainer.episode_data import build_episode_examples
from singleturn.trainer.policy_loss import Layout, PolicyBatch, Sequence, micro_batches

COLUMNS = [
    ("path", "path"),
    ("tokens", "update: computed tokens / step (median)"),
    ("ratio", "vs window"),
    ("prefill_per_prompt", "rollout prefill, each prompt"),
    ("prefill_trunks", "rollout prefill, trunks"),
]


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--states", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--response-len", type=int, default=8)
    p.add_argument(
        "--device", default="cpu", help="unused: counts only, no model runs (accepted like every bench)"
    )
    args = p.parse_args(argv)
    tok = Tokenizer.from_file(args.tokenizer)
    states = read_states(args.states)
    episodes, ep_ex, _ = build_episode_examples(
        states, tok, list_admissible=False, system_prompt=False, max_seq_len=8192
    )
    window, _ = build_examples(states, tok, history_window=2, system_prompt=False, max_seq_len=8192)
    blocks = tuple(len(e.states) for e in episodes)
    G, L, B = args.group_size, args.response_len, args.batch

    def computed(examples, idx, layout) -> int:
        seqs = [Sequence(examples[j].prompt_ids, [5] * L, torch.zeros(L), 1.0) for j in idx for _ in range(G)]
        return sum(m.packed.computed_tokens for m in micro_batches(PolicyBatch(seqs, seqs[0], 0), layout))

    def prefill(examples, idx) -> tuple[int, int]:
        prompts = [examples[j].prompt_ids for j in idx]
        _, trunks = _trunks(prompts)
        return sum(map(len, prompts)), sum(len(prompts[t]) for t in trunks)

    shared = Layout(shared_prefix=True, max_tokens=8192, row_len=4096)
    chains = Layout(shared_prefix=True, prefix_chains=True, max_tokens=8192, row_len=4096)
    draws = {  # path -> (examples, the step's states, layout)
        "window prompt, segment per group": (window, lambda st: batch_indices(st, B, len(window), 0), shared),
        "episode prompt, segment per group": (ep_ex, lambda st: batch_indices(st, B, len(ep_ex), 0), shared),
        "episode prompt, prefix chains, random states": (
            ep_ex,
            lambda st: batch_indices(st, B, len(ep_ex), 0),
            chains,
        ),
        "episode prompt, prefix chains, episode by episode": (
            ep_ex,
            lambda st: batch_indices(st, B, len(ep_ex), 0, blocks),
            chains,
        ),
    }
    env, rows, base = env_info(), [], None
    for label, (examples, draw, layout) in draws.items():
        steps = range(args.steps)
        med = statistics.median(computed(examples, draw(st), layout) for st in steps)
        pre = [prefill(examples, draw(st)) for st in steps]
        base = base or med
        rows.append(
            {
                "topic": "grpo_tokens",
                "path": label,
                "tokens": med,
                "ratio": round(base / med, 2),
                "prefill_per_prompt": statistics.median(a for a, _ in pre),
                "prefill_trunks": statistics.median(b for _, b in pre),
                "batch": B,
                "group_size": G,
                "response_len": L,
                "steps": args.steps,
                **env,
            }
        )
        print(
            f"[grpo_tokens] {label:50s} update {med:8.0f} tokens/step x{base / med:.2f}; rollout prefill "
            f"{rows[-1]['prefill_per_prompt']:.0f} -> {rows[-1]['prefill_trunks']:.0f}",
            flush=True,
        )
    write_jsonl(args.out_dir, "grpo_tokens", rows)
    write_markdown(args.out_dir, "grpo_tokens", "Tokens a single-turn GRPO step computes", rows, COLUMNS)


if __name__ == "__main__":
    main()
