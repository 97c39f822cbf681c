"""Choose the episode format's per-turn material by measurement AFTER a fixed SFT budget (issue
"compute each turn once", item 3), on held-out TRAINING games, never the evaluation games.

    python bench/episode_prompt_selection.py --model data/models/SmolLM2-135M-Instruct \
        --states data/games/states-train-n300-s0.jsonl [--held-out-games 30] [--sft-episodes 64] \
        [--batch-episodes 4] [--lr 1e-4] [--variants none list]

For each variant (`none`: the episode alone; `list`: this turn's admissible list as a per-turn suffix)
and from the same pre-trained start: SFT on whole expert episodes of the training games except the
last `--held-out-games` (sorted by path; the same episodes in the same order for every variant:
`--sft-episodes` of them, `--batch-episodes` per AdamW step, constant lr, fp32), then ranked agreement
with the expert on every state of the held-out games, teacher-forced (the expert's history, played in
lockstep through `model.EpisodePolicy`, `trainer.bound`'s procedure) with its 95% Wilson interval,
and the costs: SFT tokens and seconds per state, evaluation tokens and seconds per state. Also the
zero-shot agreement of each variant (before SFT) unless --no-zero-shot.
Output: episode_prompt_selection.jsonl + .md (default bench/results/).
"""

from __future__ import annotations

import time

import torch
from _common import base_parser, env_info, write_jsonl, write_markdown

from singleturn.harness import read_states
from singleturn.model.episode_policy import EpisodePolicy
from singleturn.model.hf_io import load_hf_checkpoint
from singleturn.model.tokenizer import Tokenizer
from singleturn.trainer.episode_data import build_episode_examples, episode_states
from singleturn.trainer.holdout import teacher_forced_actions
from singleturn.trainer.stages.sft import sft_forward_backward
from singleturn.trainer.stats import wilson_interval

COLUMNS = [
    ("variant", "per-turn material"),
    ("when", "model"),
    ("states", "held-out states"),
    ("agreement", "agreement"),
    ("wilson95", "95% interval"),
    ("eval_ms_per_state", "eval ms / state"),
    ("eval_tokens_per_state", "eval tokens / state"),
    ("sft_tokens_per_state", "SFT tokens / state"),
    ("sft_s_per_state", "SFT s / state"),
]


def agreement(model, tok, held_out: dict[str, list[dict]], *, list_admissible: bool, batch: int) -> dict:
    policy = EpisodePolicy(
        model,
        tok,
        max_episodes=batch,
        max_len=model.config.max_seq_len,
        list_admissible=list_admissible,
        system_prompt=False,
    )
    t0 = time.perf_counter()
    chosen = teacher_forced_actions(policy, held_out, batch)
    dt = time.perf_counter() - t0
    tokens = policy.cache.computed_tokens
    policy.close()
    states = [s for g in held_out for s in held_out[g]]
    k = sum(c == s["expert_action"] for c, s in zip(chosen, states))
    lo, hi = wilson_interval(k, len(states))
    return {
        "states": len(states),
        "agreement": k / max(len(states), 1),
        "wilson95": f"[{lo:.3f}, {hi:.3f}]",
        "eval_ms_per_state": 1e3 * dt / max(len(states), 1),
        "eval_tokens_per_state": tokens / max(len(states), 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--states", required=True)
    p.add_argument("--held-out-games", type=int, default=30)
    p.add_argument("--sft-episodes", type=int, default=64)
    p.add_argument("--batch-episodes", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--variants", nargs="+", default=["none", "list"], choices=["none", "list"])
    p.add_argument("--no-zero-shot", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (accepted like every bench)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    episodes = sorted(episode_states(read_states(args.states)), key=lambda ep: str(ep[0]["game"]))
    if len(episodes) <= args.held_out_games:
        raise SystemExit(f"{len(episodes)} episodes: fewer than --held-out-games + 1")
    train, held = episodes[: -args.held_out_games], episodes[-args.held_out_games :]
    g = torch.Generator().manual_seed(args.seed)
    order = [train[i] for i in torch.randperm(len(train), generator=g)[: args.sft_episodes].tolist()]
    held_out = {str(ep[0]["game"]): ep for ep in held}
    env, rows, written = env_info(), [], 0
    for variant in args.variants:
        la = variant == "list"
        model, _ = load_hf_checkpoint(args.model, dtype=torch.float32)
        base = {
            "topic": "episode_prompt_selection",
            "variant": variant,
            "threads": args.threads,
            "dtype": "float32",
            "sft_episodes": len(order),
            "lr": args.lr,
            **env,
        }
        if not args.no_zero_shot:
            model.eval()
            with torch.no_grad():
                rows.append(
                    {
                        **base,
                        "when": "zero-shot",
                        **agreement(model, tok, held_out, list_admissible=la, batch=args.eval_batch),
                    }
                )
            print(f"[selection] {variant} zero-shot {rows[-1]['agreement']:.3f}", flush=True)
        trees, _, dropped = build_episode_examples(
            [s for ep in order for s in ep],
            tok,
            list_admissible=la,
            system_prompt=False,
            max_seq_len=model.config.max_seq_len,
        )
        if dropped:
            raise SystemExit(f"{dropped} states of the SFT episodes do not fit the model's context")
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        model.train()
        t0, n_states = time.perf_counter(), sum(len(t.states) for t in trees)
        for i in range(0, len(trees), args.batch_episodes):
            opt.zero_grad(set_to_none=True)
            stats = sft_forward_backward(
                model,
                lambda m=model: m.output.weight,
                trees[i : i + args.batch_episodes],
                device="cpu",
                max_tokens=args.max_tokens,
                row_len=args.max_tokens,
            )
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            print(
                f"[selection] {variant} SFT step {i // args.batch_episodes + 1}: loss {stats['loss']:.4f}",
                flush=True,
            )
        sft_s = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            res = agreement(model, tok, held_out, list_admissible=la, batch=args.eval_batch)
        rows.append(
            {
                **base,
                "when": f"after SFT ({n_states} states)",
                **res,
                "sft_tokens_per_state": sum(t.num_tokens for t in trees) / n_states,
                "sft_s_per_state": sft_s / n_states,
            }
        )
        print(f"[selection] {variant} after SFT {res['agreement']:.3f} {res['wilson95']}", flush=True)
        write_jsonl(
            args.out_dir, "episode_prompt_selection", rows[written:]
        )  # each piece as it finishes (appends)
        written = len(rows)
        write_markdown(
            args.out_dir,
            "episode_prompt_selection",
            "Episode format: per-turn material chosen after SFT on held-out training games",
            rows,
            COLUMNS,
        )


if __name__ == "__main__":
    main()
