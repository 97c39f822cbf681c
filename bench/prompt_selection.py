"""Prompt settings chosen by measurement on held-out TRAINING games (never the evaluation games).

For a checkpoint, ranked decoding's agreement with the expert (the admissible command with the
highest total log-prob == the expert's action) on states of the last `--held-out-games` training
games (sorted by path; a random sample of `--states` of their states, seed 0), for each variant,
one change at a time from the config's choice (history window 2, the admissible line, no system
message, ranked decoding): history window 1 and 3; without the `Admissible actions:` line (the user
message cut before it: ranking scores the admissible commands anyway, so the line is only context,
and it is ~40% of a SmolLM2 prompt); with the project's system message (harness SYSTEM_PROMPT);
trie-greedy decoding (token by token under the admissible-command trie) instead of ranking. Also
the mean prompt tokens and the seconds per state of each variant, so the cost is visible.

    python bench/prompt_selection.py --model data/models/SmolLM2-135M-Instruct \
        --states data/games/states-train-n300-s0.jsonl [--states-sampled 60]

Writes <out-dir>/prompt_selection.jsonl and .md (default bench/results/).
"""

from __future__ import annotations

import json
import random
import time

import torch
from _common import base_parser, env_info, markdown_table, write_jsonl, write_markdown

from singleturn.harness import parse_action, read_states, render_prompt
from singleturn.model.constrained import action_trie, allowed_tokens_fn
from singleturn.model.generate import score_continuations
from singleturn.model.hf_io import load_hf_checkpoint
from singleturn.model.policy import sample_completions
from singleturn.model.tokenizer import Tokenizer

_ADMISSIBLE_LINE = "\nAdmissible actions: "


def messages(state: dict, window: int, system_prompt: bool, admissible: bool) -> list[dict]:
    m = render_prompt(state, history_window=window, system_prompt=system_prompt)
    if not admissible:
        text = m[-1]["content"]
        m[-1] = {"role": "user", "content": text[: text.rindex(_ADMISSIBLE_LINE)]}
    return m


def act(model, tok, messages: list[dict], admissible: list[str], decoding: str) -> str:
    """The policy's command for one prompt (each variant's messages as written), cache-free: the
    admissible command of highest total log-prob, or greedy decoding under the admissible trie."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    if decoding == "rank":
        scores = score_continuations(model, [prompt], [[tok.encode(a) + [tok.eot_id] for a in admissible]])[0]
        return admissible[max(range(len(admissible)), key=scores.__getitem__)]
    trie = action_trie(tok, admissible)
    (done,) = sample_completions(
        model,
        tok,
        [prompt],
        num_samples=1,
        max_new_tokens=trie.max_len,
        temperature=0.0,
        seed=0,
        allowed_tokens=allowed_tokens_fn([trie]),
    )
    return done.text


def main(argv=None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--states", required=True)
    p.add_argument("--held-out-games", type=int, default=30)
    p.add_argument("--states-sampled", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_file(args.model)
    model, _ = load_hf_checkpoint(args.model, device="cpu", dtype=torch.float32)
    model.eval()
    rows = read_states(args.states)
    held = set(sorted({r["game"] for r in rows})[-args.held_out_games :])
    pool = [r for r in rows if r["game"] in held]
    sample = random.Random(0).sample(pool, min(args.states_sampled, len(pool)))
    base = {"history_window": 2, "admissible_in_prompt": True, "system_prompt": False, "decoding": "rank"}
    variants = [
        base,
        {**base, "history_window": 1},
        {**base, "history_window": 3},
        {**base, "admissible_in_prompt": False},
        {**base, "system_prompt": True},
        {**base, "decoding": "trie-greedy"},
    ]
    out = []
    for v in variants:
        decoding = "greedy" if v["decoding"] == "trie-greedy" else "rank"
        t0, hits, tokens = time.perf_counter(), 0, 0
        for s in sample:
            m = messages(s, v["history_window"], v["system_prompt"], v["admissible_in_prompt"])
            tokens += len(tok.apply_chat_template(m))
            with torch.no_grad():
                text = act(model, tok, m, s["admissible"], decoding)
            hits += parse_action(text, s["admissible"]) == s["expert_action"]
        n = len(sample)
        row = {
            "model": args.model,
            **v,
            "states": n,
            "agreement": hits / n,
            "hits": hits,
            "prompt_tokens_mean": tokens / n,
            "s_per_state": (time.perf_counter() - t0) / n,
            "threads": args.threads,
            "held_out_games": len(held),
        }
        out.append(row)
        print(json.dumps(row), flush=True)
    env = env_info()
    out = [{**env, **r} for r in out]
    write_jsonl(args.out_dir, "prompt_selection", out)
    cols = [
        ("history_window", "history K"),
        ("admissible_in_prompt", "admissible line"),
        ("system_prompt", "system message"),
        ("decoding", "decoding"),
        ("hits", "agree"),
        ("states", "states"),
        ("agreement", "agreement"),
        ("prompt_tokens_mean", "prompt tokens"),
        ("s_per_state", "s/state"),
    ]
    write_markdown(
        args.out_dir, "prompt_selection", "Ranked agreement on held-out training states", out, cols
    )
    print(markdown_table(out, cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
