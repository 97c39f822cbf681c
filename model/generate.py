"""Batched sampling with a static KV cache: each prompt prefilled once, decoded into num_samples rows.

GRPO samples G responses per prompt; the G rows share the prompt, so the prompt is prefilled once
(B rows) and its KV is copied into its G cache rows (`Transformer.broadcast_cache_rows`) before
decoding B*G rows together. Prompts of different lengths are right-padded for the prefill (causal
attention makes the pads invisible to the real tokens); each row then decodes at its own positions
(`input_pos` per row: row b's first new token is at position len(prompt_b)), and the cache mask
hides the stale pad slots past each row's position.

`allowed_tokens(row, prefix) -> ids` (optional) constrains decoding: before each draw, every unfinished
row's logits outside the ids it returns are set to -inf (e.g. a trie over admissible commands), so
the sampled tokens and their log-probs are under that masked distribution.

Sampling goes through `kernels.sample_tokens` with offset = decode step and the row index inside
the Philox counter, so a draw depends only on (seed, step, row): reproducible on any device.

`score_continuations(model, prompts, continuations)` is the scoring counterpart (ranking a fixed set
of candidate actions by their total log-prob): one forward per prompt over the prompt followed by
all its candidates under a tree mask (each candidate sees the prompt and itself; the shared-prefix
layout of model/masks.py, the one GRPO training uses), so a state with 40 admissible commands costs
one pass over ~prompt + 40 x 6 tokens, not 40 prompts.

References: gpt-fast `generate.py` (static cache, prefill/decode split); vLLM's prefix sharing
across a request's n samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kernels.sampling import sample_tokens
from model.masks import build_shared_prefix_batch
from model.transformer import Transformer

__all__ = ["Samples", "generate", "score_continuations"]

# Rows that finished keep decoding (their tokens are discarded) until a periodic check sees all done.
# The check is `.item()`-style host sync; doing it every few steps keeps the GPU queue full while
# wasting at most DONE_CHECK_EVERY - 1 steps of decode at the end.
DONE_CHECK_EVERY = 8


@dataclass
class Samples:
    """Generated continuations, prompt-major: prompt i's samples are rows i*S .. i*S+S-1.

    tokens   [B*S, max_new] int64  sampled ids, pad_id after the stop token
    logprobs [B*S, max_new] fp32   log-prob of each sampled token under the sampling distribution
                                   (temperature / top-k / top-p applied; 0 after the stop, 0 for greedy)
    lengths  [B*S] int64           generated tokens per row, the stop token included
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor

    def token_lists(self) -> list[list[int]]:
        """Each row's generated ids up to and including its stop token."""
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    pad_id: int = 0,
    allowed_tokens: Callable[[int, list[int]], Sequence[int]] | None = None,
) -> Samples:
    """Sample `num_samples` continuations of each prompt (token-id lists) -> Samples (see its docstring).

    A row ends at the first id in `stop_ids` (kept, counted in `lengths`) or after max_new_tokens.
    temperature == 0 is greedy. The KV cache is allocated for this call and freed on return.
    allowed_tokens(row, ids generated so far) -> the ids row may draw next (see the module docstring);
    it is called for unfinished rows only (a host sync per step) and must return at least one id.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
    device = model.tok_embeddings.weight.device
    B, S = len(prompts), num_samples
    N = B * S
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    max_len = int(lens.max())
    # Right padding for the prefill: any valid id (pad_id may be out of vocabulary); causal attention
    # keeps it invisible to the prompt, and decoding overwrites those cache slots before reading them.
    prompt_BL = torch.zeros((B, max_len), dtype=torch.int64)
    for i, p in enumerate(prompts):
        prompt_BL[i, : len(p)] = torch.as_tensor(p, dtype=torch.int64)
    prompt_BL, lens = prompt_BL.to(device), lens.to(device)
    stop = torch.as_tensor(list(stop_ids), dtype=torch.int64, device=device)

    tokens_NT = torch.full((N, max_new_tokens), pad_id, dtype=torch.int64, device=device)
    logprobs_NT = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
    lengths_N = torch.zeros(N, dtype=torch.int64, device=device)
    done_N = torch.zeros(N, dtype=torch.bool, device=device)

    model.setup_caches(N, max_len + max_new_tokens)
    try:
        # Prefill: B prompt rows once; only each prompt's last position goes through the LM head.
        h_BLD = model.hidden(prompt_BL)
        last_BD = h_BLD[torch.arange(B, device=device), lens - 1]  # (B, D)
        logits_NV = model.output(last_BD).repeat_interleave(S, dim=0)  # (N, V)
        model.broadcast_cache_rows(B, S)
        pos_N = lens.repeat_interleave(S)  # (N,) position of the token about to be sampled

        for step in range(max_new_tokens):
            if allowed_tokens is not None:
                logits_NV = _mask_logits(logits_NV, allowed_tokens, tokens_NT[:, :step], done_N)
            tok_N, logp_N = sample_tokens(
                logits_NV, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, offset=step
            )
            # Finished rows still decode (static shapes, no sync) on their raw draws; the output hides them.
            tokens_NT[:, step] = torch.where(done_N, pad_id, tok_N)
            logprobs_NT[:, step] = torch.where(done_N, 0.0, logp_N)
            lengths_N += (~done_N).long()
            done_N |= torch.isin(tok_N, stop)
            if step + 1 == max_new_tokens:
                break
            if (step + 1) % DONE_CHECK_EVERY == 0 and bool(done_N.all()):  # host sync, see DONE_CHECK_EVERY
                break
            logits_NV = model(tok_N[:, None], input_pos=pos_N[:, None])[:, -1]  # (N, V)
            pos_N = pos_N + 1
    finally:
        model.clear_caches()
    return Samples(tokens=tokens_NT, logprobs=logprobs_NT, lengths=lengths_N)


def _mask_logits(logits_NV, allowed_tokens, prefix_NT, done_N) -> torch.Tensor:
    """-inf outside `allowed_tokens(row, prefix)` for each unfinished row (finished rows untouched)."""
    N, V = logits_NV.shape
    keep_NV = torch.ones((N, V), dtype=torch.bool)
    prefixes, done = prefix_NT.tolist(), done_N.tolist()  # host sync
    for r in range(N):
        if done[r]:
            continue
        ids = list(allowed_tokens(r, prefixes[r]))
        if not ids:
            raise ValueError(f"allowed_tokens returned no id for row {r} after {prefixes[r]}")
        keep_NV[r] = False
        keep_NV[r, ids] = True
    return logits_NV.masked_fill(~keep_NV.to(logits_NV.device), float("-inf"))


@torch.inference_mode()
def score_continuations(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    *,
    max_tokens: int = 8192,
) -> list[list[float]]:
    """Total log-prob (fp32 log-softmax, summed in fp64) of each continuation after its prompt.

    continuations[b] lists prompt b's candidates (token-id lists, non-empty); the result has the same
    nesting. One row per prompt: the prompt, then every candidate, under tree attention (a candidate
    sees the prompt and its own earlier tokens, at RoPE positions len(prompt)+t), so the prompt is
    encoded once and nothing is cached. Rows are grouped into forwards of at most `max_tokens`
    (padded) tokens; only the positions that predict a candidate token go through the LM head.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuation lists")
    groups = []
    for b, (p, cands) in enumerate(zip(prompts, continuations)):
        if not p or not cands or any(len(c) == 0 for c in cands):
            raise ValueError(f"prompt {b}: needs a non-empty prompt and non-empty candidates")
        groups.append((list(p), [list(c) for c in cands]))
    device = model.tok_embeddings.weight.device
    # One prompt per row (items_per_row=1); rows x longest row <= max_tokens per forward.
    batches = build_shared_prefix_batch(groups, max_tokens=max_tokens, items_per_row=1, device=device)
    logp: list[float] = []
    for mb in batches:
        h = model.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask)  # (B, T, D)
        h_N = h[mb.rows, mb.cols]  # (N, D): the slots that predict a candidate token
        logp_N = model.output(h_N).float().log_softmax(-1).gather(1, mb.targets[:, None])  # (N, 1)
        logp += logp_N[:, 0].double().cpu().tolist()
    out, k = [], 0  # targets come candidate by candidate, in input order
    for _, cands in groups:
        row = []
        for c in cands:
            row.append(float(sum(logp[k : k + len(c)])))
            k += len(c)
        out.append(row)
    return out
