"""Ranking admissible commands: `score_continuations` over a token trie vs the flat layout it replaced.

`flat` is the previous implementation (kept here as the baseline): one row [prompt | c_1 | ... | c_K]
per state, every candidate in full under the shared-prefix mask (`build_shared_prefix_batch`), the LM
head at every candidate token. `trie` is `model.generate.score_continuations`: one row [prompt | trie
nodes], one slot per distinct candidate token-prefix, the LM head once per predicting slot.

Per state (one state per call, as the evaluator ranks them): tokens computed (the row), LM-head rows,
wall time of both layouts interleaved in one process (`_common.time_interleaved`; on shared cores the
ratio is the measurement), the flat/trie time ratio, and whether both pick the same command.

Real job (the default): the SmolLM2-135M-Instruct checkpoint and `--states` states drawn (seeded) from
the states file, rendered as the trainer renders them (`render_prompt(state, history_window=2,
system_prompt=False)`, candidates `encode(a) + [eot_id]`). `--cpu-smoke`: a tiny random model on
synthetic word-level states (no data needed; what `make bench` runs).

    OMP_NUM_THREADS=1 python bench/bench_rank_trie.py [--states 20] [--reps 3] [--out-dir DIR]

Prints a markdown table and the medians; with --out-dir also appends rows to <out-dir>/rank_trie.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
from pathlib import Path

import torch
from _common import REPO, env_info, markdown_table, time_interleaved, write_jsonl

from singleturn.model import PRESETS, Transformer, build_shared_prefix_batch, score_continuations
from singleturn.model.generate import _token_trie, _trie_rows

CHECKPOINT = REPO / "data" / "models" / "SmolLM2-135M-Instruct"
STATES = REPO / "data" / "games" / "states-train-n300-s0.jsonl"
COLUMNS = [
    ("state", "state"),
    ("prompt", "prompt"),
    ("candidates", "cands"),
    ("cand_tokens", "cand tokens"),
    ("trie_nodes", "trie nodes"),
    ("tokens_flat", "tokens flat"),
    ("tokens_trie", "tokens trie"),
    ("head_flat", "head rows flat"),
    ("head_trie", "head rows trie"),
    ("ms_flat", "ms flat"),
    ("ms_trie", "ms trie"),
    ("ratio", "flat/trie"),
    ("same_argmax", "same argmax"),
    ("max_diff", "max |diff|"),
]


@torch.inference_mode()
def score_flat(model, prompts, continuations, *, max_tokens=8192):
    """The flat layout (score_continuations before the trie): every candidate token computed."""
    groups = [(list(p), [list(c) for c in cands]) for p, cands in zip(prompts, continuations)]
    device = model.tok_embeddings.weight.device
    batches = build_shared_prefix_batch(groups, max_tokens=max_tokens, items_per_row=1, device=device)
    logp: list[float] = []
    for mb in batches:
        h = model.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask)  # (B, T, D)
        logp_N = model.output(h[mb.rows, mb.cols]).float().log_softmax(-1).gather(1, mb.targets[:, None])
        logp += logp_N[:, 0].double().cpu().tolist()
    out, k = [], 0  # targets come candidate by candidate, in input order
    for _, cands in groups:
        row = []
        for c in cands:
            row.append(float(sum(logp[k : k + len(c)])))
            k += len(c)
        out.append(row)
    return out


def real_cases(n: int, seed: int, device):
    """(model, [(prompt ids, candidate ids)]) for n seeded states of the states file."""
    from singleturn.harness.prompts import render_prompt
    from singleturn.model.hf_io import load_hf_checkpoint
    from singleturn.model.policy import encode_prompt
    from singleturn.model.tokenizer import Tokenizer

    model, _ = load_hf_checkpoint(CHECKPOINT, device=device, dtype=torch.float32)
    tok = Tokenizer.from_file(CHECKPOINT)
    lines = STATES.read_text().splitlines()
    cases = []
    for i in sorted(random.Random(seed).sample(range(len(lines)), n)):
        state = json.loads(lines[i])
        cands = [tok.encode(a) + [tok.eot_id] for a in state["admissible"]]
        prompt, _ = encode_prompt(tok, render_prompt(state, history_window=2, system_prompt=False), 8192)
        cases.append((i, prompt, cands))
    return model.eval(), cases


def smoke_cases(n: int, seed: int, device):
    """A tiny random model and synthetic word-level states shaped like ALFWorld's (no data needed)."""
    cfg = dataclasses.replace(PRESETS["tiny"], dim=64, n_layers=2, ffn_dim=160, vocab_size=512)
    model = Transformer(cfg)
    model.init_weights(seed)
    words: dict[str, int] = {}
    rng = random.Random(seed)

    def enc(text):
        return [words.setdefault(w, 10 + len(words)) for w in text.split()] + [4]  # 4: eot of the preset

    cases = []
    for i in range(n):
        recs = [
            f"{r} {k}"
            for r in ("cabinet", "drawer", "shelf", "sinkbasin")
            for k in range(1, rng.randint(2, 6))
        ]
        acts = [f"go to {r}" for r in recs] + ["look", "inventory", "help", f"open {recs[0]}"]
        cases.append(
            (i, [rng.randrange(100, 512) for _ in range(rng.randint(80, 120))], [enc(a) for a in acts])
        )
    return model.to(device).eval(), cases


def measure(model, state, prompt, cands, reps: int) -> dict:
    # The scoring calls are the warm-up.
    flat, trie = score_flat(model, [prompt], [cands])[0], score_continuations(model, [prompt], [cands])[0]
    rows = _trie_rows([prompt], [_token_trie(cands)])
    t = time_interleaved(
        {
            "flat": lambda: score_flat(model, [prompt], [cands]),
            "trie": lambda: score_continuations(model, [prompt], [cands]),
        },
        reps=reps,
    )
    n_cand = sum(len(c) for c in cands)
    return {
        "state": state,
        "prompt": len(prompt),
        "candidates": len(cands),
        "cand_tokens": n_cand,
        "trie_nodes": int(rows.targets.numel()),
        "tokens_flat": len(prompt) + n_cand,
        "tokens_trie": int(rows.tokens.numel()),
        "head_flat": n_cand,
        "head_trie": int(rows.rows.numel()),
        "ms_flat": t["flat"]["ms_median"],
        "ms_trie": t["trie"]["ms_median"],
        "ratio": t["flat"]["ms_median"] / t["trie"]["ms_median"],
        "same_argmax": max(range(len(cands)), key=flat.__getitem__)
        == max(range(len(cands)), key=trie.__getitem__),
        "max_diff": max(abs(a - b) for a, b in zip(flat, trie)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--states", type=int, default=20)
    p.add_argument("--reps", type=int, default=3, help="timed calls per layout and state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", type=Path, default=None, help="append rows to <out-dir>/rank_trie.jsonl")
    p.add_argument("--quick", action="store_true", help="5 states, 2 reps")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny random model, synthetic states, seconds")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, reps = (3, 1) if args.cpu_smoke else (5, 2) if args.quick else (args.states, args.reps)
    model, cases = (smoke_cases if args.cpu_smoke else real_cases)(n, args.seed, args.device)
    rows = []
    for state, prompt, cands in cases:
        rows.append(measure(model, state, prompt, cands, reps))
        print(json.dumps(rows[-1]), flush=True)
    print(markdown_table(rows, COLUMNS))
    med = {
        k: statistics.median(r[k] for r in rows)
        for k in ("cand_tokens", "trie_nodes", "tokens_flat", "tokens_trie", "ratio")
    }
    print(
        f"medians over {len(rows)} states: candidate tokens {med['cand_tokens']} -> trie nodes {med['trie_nodes']}; "
        f"tokens computed {med['tokens_flat']} -> {med['tokens_trie']}; flat/trie time {med['ratio']:.3f}; "
        f"same argmax {sum(r['same_argmax'] for r in rows)}/{len(rows)}; "
        f"max |score diff| {max(r['max_diff'] for r in rows):.2e}"
    )
    if args.out_dir:
        env = env_info() | {"threads": torch.get_num_threads(), "reps": reps, "smoke": args.cpu_smoke}
        write_jsonl(args.out_dir, "rank_trie", [env | r for r in rows])


if __name__ == "__main__":
    main()
