"""Batched sampling with a static KV cache: each prompt prefilled once, decoded into num_samples rows.

`generate` prefills the B prompts once, copies each prompt's KV into its G cache rows
(`Transformer.gather_cache_rows`) and decodes the B*G rows together, each at its own positions. A
prompt that is a prefix of another prompt of the call (the states of one episode in the episode
format: each state's prompt extends the last) is not prefilled on its own: causal attention makes
its KV the first slots of the longer prompt's, and its next-token logits the longer prompt's hidden
state at its last position, so only the longest prompt of each chain (its trunk) is computed.
`allowed_tokens(row, prefix)` optionally masks every draw (e.g. an admissible-command trie). Draws
go through `kernels.sample_tokens` keyed by (seed, step, row): reproducible on any device.
`score_continuations` ranks fixed candidates by total log-prob in one forward per prompt over
[prompt | token trie of the candidates]. Details: docs/pieces.md (model/).

References: gpt-fast `generate.py` (static cache, prefill/decode split); vLLM's prefix sharing
across a request's n samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from singleturn.kernels.sampling import sample_tokens
from singleturn.model.masks import pack_by_tokens
from singleturn.model.transformer import Transformer

__all__ = ["Samples", "generate", "kv_cache_bytes", "plan_chunks", "score_continuations"]

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
    max_cache_bytes: int = 0,
    stream: int = 0,
) -> Samples:
    """Sample `num_samples` continuations of each prompt (token-id lists) -> Samples (see its docstring).

    A row ends at the first id in `stop_ids` (kept, counted in `lengths`) or after max_new_tokens.
    temperature == 0 is greedy. The KV cache is allocated for this call and freed on return.
    allowed_tokens(row, ids generated so far) -> the ids row may draw next (see the module docstring);
    it is called for unfinished rows only (a host sync per step) and must return at least one id.

    max_cache_bytes > 0 bounds the KV cache one batch allocates (`kv_cache_bytes`): when the whole
    call's cache would exceed it, the prompts are decoded in consecutive chunks (whole prompts, in
    order, each chunk's cache within the bound; `plan_chunks`) and the rows concatenated. Chunk c draws
    from stream `stream + c` (the high 32 bits of the sampler's counter offset), so chunk 0 draws
    exactly what the unchunked call draws and no two chunks share a draw. A single prompt whose rows
    alone exceed the bound is a ValueError naming the sizes.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
    if max_cache_bytes < 0 or not 0 <= stream < 1 << 32:
        raise ValueError(
            f"max_cache_bytes must be >= 0 and stream in [0, 2^32), got {max_cache_bytes}, {stream}"
        )
    chunks = plan_chunks(model, prompts, num_samples, max_new_tokens, max_cache_bytes)
    if len(chunks) > 1:
        kw = dict(
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop_ids=stop_ids,
            seed=seed,
            pad_id=pad_id,
        )
        parts = []
        for c, (a, b) in enumerate(chunks):
            rows = None if allowed_tokens is None else _shifted(allowed_tokens, a * num_samples)
            parts.append(generate(model, prompts[a:b], allowed_tokens=rows, stream=stream + c, **kw))
        return Samples(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "logprobs", "lengths"))
        )
    device = model.tok_embeddings.weight.device
    B, S = len(prompts), num_samples
    N = B * S
    trunk, trunks = _trunks(prompts)
    prompt_BL, _ = _right_padded([prompts[t] for t in trunks], device)
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
    max_len = prompt_BL.shape[1]
    stop = torch.as_tensor(list(stop_ids), dtype=torch.int64, device=device)

    tokens_NT = torch.full((N, max_new_tokens), pad_id, dtype=torch.int64, device=device)
    logprobs_NT = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
    lengths_N = torch.zeros(N, dtype=torch.int64, device=device)
    done_N = torch.zeros(N, dtype=torch.bool, device=device)

    model.setup_caches(N, max_len + max_new_tokens)
    try:
        logits_NV, pos_N = _prefill(model, prompt_BL, lens, torch.as_tensor(trunk, device=device), S)

        for step in range(max_new_tokens):
            if allowed_tokens is not None:
                logits_NV = _mask_logits(logits_NV, allowed_tokens, tokens_NT[:, :step], done_N)
            tok_N, logp_N = sample_tokens(
                logits_NV,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                offset=(stream << 32) + step,
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


def kv_cache_bytes(model: Transformer, rows: int, seq_len: int) -> int:
    """Bytes of the static KV cache `Transformer.setup_caches(rows, seq_len)` allocates (k and v, every layer)."""
    c = model.config
    itemsize = model.tok_embeddings.weight.element_size()
    return 2 * c.n_layers * rows * c.n_kv_heads * seq_len * c.head_dim * itemsize


def plan_chunks(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    max_bytes: int,
) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges of `prompts`, greedy in order, each range's KV cache (its prompts' rows
    times its longest prompt plus max_new_tokens) within max_bytes: one range when everything fits or
    max_bytes is 0 (no bound)."""
    if max_bytes <= 0:
        return [(0, len(prompts))]
    chunks, a, longest = [], 0, 0
    for i, p in enumerate(prompts):
        one = kv_cache_bytes(model, num_samples, len(p) + max_new_tokens)
        if one > max_bytes:
            raise ValueError(
                f"generate: prompt {i} ({len(p)} ids) x {num_samples} samples needs a {one / 2**20:.1f} MiB KV cache "
                f"on its own, over max_cache_bytes = {max_bytes / 2**20:.1f} MiB: raise the bound"
            )
        grown = max(longest, len(p))
        if i > a and kv_cache_bytes(model, (i + 1 - a) * num_samples, grown + max_new_tokens) > max_bytes:
            chunks.append((a, i))
            a, grown = i, len(p)
        longest = grown
    chunks.append((a, len(prompts)))
    return chunks


def _shifted(allowed_tokens: Callable[[int, list[int]], Sequence[int]], first: int):
    """allowed_tokens for a chunk whose row 0 is row `first` of the whole call."""
    return lambda row, prefix: allowed_tokens(first + row, prefix)


def _right_padded(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids [B, L] right-padded, lengths [B]) on `device`.

    The padding is any valid id (pad_id may be out of vocabulary): causal attention keeps it
    invisible to the prompt, and decoding overwrites those cache slots before reading them.
    """
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    prompt_BL = torch.zeros((len(prompts), int(lens.max())), dtype=torch.int64)
    for i, p in enumerate(prompts):
        prompt_BL[i, : len(p)] = torch.as_tensor(p, dtype=torch.int64)
    return prompt_BL.to(device), lens.to(device)


def _trunks(prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(trunk of each prompt, the trunks): trunk[i] indexes `trunks`, the prompts (by index, in order
    of first use) that are a prefix of no other prompt; prompt i is a prefix of prompts[trunks[trunk[i]]].
    trunk[i] <= i, so the cache rows can be spread in place (see `_prefill`)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    longest: dict[int, int] = {}  # prompt -> the prompt it is computed as part of
    maximal: list[int] = []
    for i in order:  # longer first: a prompt's trunk is already known when it is reached
        p = prompts[i]
        longest[i] = next((m for m in maximal if list(prompts[m][: len(p)]) == list(p)), i)
        if longest[i] == i:
            maximal.append(i)
    trunks: list[int] = []
    slot: dict[int, int] = {}
    trunk = []
    for i in range(len(prompts)):
        m = longest[i]
        if m not in slot:
            slot[m] = len(trunks)
            trunks.append(m)
        trunk.append(slot[m])
    return trunk, trunks


def _prefill(model: Transformer, trunk_BL: torch.Tensor, lens: torch.Tensor, trunk: torch.Tensor, S: int):
    """Prefill the trunk rows once (only each prompt's last position goes through the LM head), then
    copy each prompt's trunk row to its S sample rows: (next-token logits [B*S, V], positions [B*S]).
    Prompt i reads trunk row trunk[i] <= i, so writing rows in place never overwrites a row still to
    be read (`KVCache.gather_rows` copies a layer's rows at once anyway)."""
    h_TLD = model.hidden(trunk_BL)
    last_BD = h_TLD[trunk, lens - 1]  # (B, D): each prompt's last position within its trunk
    logits_NV = model.output(last_BD).repeat_interleave(S, dim=0)  # (N, V)
    model.gather_cache_rows(trunk.repeat_interleave(S))
    pos_N = lens.repeat_interleave(S)  # (N,) position of the token about to be sampled
    return logits_NV, pos_N


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

    continuations[b] lists prompt b's candidates (token-id lists, non-empty; duplicates and candidates
    that are prefixes of others allowed); the result has the same nesting and order. One row per
    prompt: the prompt, then the token trie of its candidates (see the module docstring), so the
    prompt and every shared candidate prefix are encoded once and nothing is cached. Rows are grouped,
    in input order, into forwards of at most `max_tokens` padded tokens (B x T; a longer row is a
    forward of its own); only the slots that predict a trie node go through the LM head.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuation lists")
    for b, (p, cands) in enumerate(zip(prompts, continuations)):
        if not p or not cands or any(len(c) == 0 for c in cands):
            raise ValueError(f"prompt {b}: needs a non-empty prompt and non-empty candidates")
    prompts = [list(p) for p in prompts]
    tries = [_token_trie(cands) for cands in continuations]
    device = model.tok_embeddings.weight.device
    # One prompt per row (items_per_row=1); rows x longest row <= max_tokens per forward.
    lengths = [len(p) + len(t.tokens) for p, t in zip(prompts, tries)]
    plan = pack_by_tokens(lengths, max_tokens=max_tokens, items_per_row=1)
    node_logp: list[list[float]] = []  # prompt b's trie nodes -> log-prob of the node's token
    for batch in plan:
        idx = [row[0] for row in batch]  # consecutive prompts, in input order
        rows = _trie_rows([prompts[i] for i in idx], [tries[i] for i in idx])
        tokens, positions, mask = (x.to(device) for x in (rows.tokens, rows.positions, rows.mask))
        h = model.hidden(tokens, positions=positions, attn_mask=mask)  # (B, T, D)
        h_S = h[rows.rows.to(device), rows.cols.to(device)]  # (S, D): the slots that predict some node
        logp_SV = model.output(h_S).float().log_softmax(-1)  # (S, V) fp32
        logp_N = logp_SV[rows.slot.to(device), rows.targets.to(device)]  # (N,) every node of the batch
        flat = logp_N.double().cpu().tolist()  # host sync, once per forward
        k = 0
        for i in idx:
            n = len(tries[i].tokens)
            node_logp.append(flat[k : k + n])
            k += n
    # A candidate's score: the fp64 sum over its path, root first (a duplicate gets the same path).
    return [[float(sum(lp[v] for v in path)) for path in t.paths] for lp, t in zip(node_logp, tries)]


@dataclass
class _Trie:
    """Token trie of one prompt's candidates: nodes in creation order (a parent before its children)."""

    tokens: list[int]  # node -> its token id
    parent: list[int]  # node -> parent node, -1 at depth 0
    depth: list[int]  # node -> 0 for a candidate's first token
    paths: list[list[int]]  # candidate -> its nodes, root first (len = the candidate's length)


def _token_trie(cands: Sequence[Sequence[int]]) -> _Trie:
    """One node per distinct token-prefix of `cands`; each candidate's path through it."""
    t = _Trie([], [], [], [])
    child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for c in cands:
        node, path = -1, []
        for tok in c:
            nxt = child.get((node, tok))
            if nxt is None:
                nxt = child[(node, tok)] = len(t.tokens)
                t.tokens.append(int(tok))
                t.parent.append(node)
                t.depth.append(0 if node < 0 else t.depth[node] + 1)
            node = nxt
            path.append(node)
        t.paths.append(path)
    return t


@dataclass
class _TrieRows:
    """Rows [prompt | trie nodes | pad] for one forward (S predicting slots, N = all trie nodes)."""

    tokens: torch.Tensor  # (B, T) int64
    positions: torch.Tensor  # (B, T) int64: prompt 0..P-1, node len(prompt) + depth, pad 0
    mask: torch.Tensor  # (B, T, T) bool, True where query i may attend key j
    rows: torch.Tensor  # (S,) int64 \ the hidden state at (rows[s], cols[s]) predicts the nodes
    cols: torch.Tensor  # (S,) int64 / whose slot[n] == s
    slot: torch.Tensor  # (N,) int64, nodes prompt by prompt, in node order
    targets: torch.Tensor  # (N,) int64: the node's token


def _trie_rows(prompts: Sequence[list[int]], tries: Sequence[_Trie]) -> _TrieRows:
    """Tokens, positions, the dense trie mask and the LM-head gather indices of rows [prompt | trie]."""
    B = len(prompts)
    T = max(len(p) + len(t.tokens) for p, t in zip(prompts, tries))
    tokens = torch.zeros((B, T), dtype=torch.int64)  # pad id 0: any valid id, no one attends to it
    positions = torch.zeros((B, T), dtype=torch.int64)
    mask = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)  # every slot sees itself: no all-masked pad row
    rows, cols, slot, targets = [], [], [], []
    for b, (p, t) in enumerate(zip(prompts, tries)):
        P, M = len(p), len(t.tokens)
        tokens[b, :P] = torch.as_tensor(p, dtype=torch.int64)
        tokens[b, P : P + M] = torch.as_tensor(t.tokens, dtype=torch.int64)
        positions[b, :P] = torch.arange(P)
        positions[b, P : P + M] = P + torch.as_tensor(t.depth, dtype=torch.int64)
        mask[b, :P, :P] = torch.ones((P, P), dtype=torch.bool).tril()  # the prompt is causal
        mask[b, P : P + M, :P] = True  # every node sees the whole prompt
        anc: list[list[int]] = []  # node -> its ancestors' columns and its own, root first
        q, kv = [], []
        for i, par in enumerate(t.parent):
            anc.append((anc[par] if par >= 0 else []) + [P + i])  # parent < i: already listed
            q += [P + i] * len(anc[i])
            kv += anc[i]
        mask[b, q, kv] = True
        seen: dict[int, int] = {}  # predicting column -> its slot among the batch's S
        for par, tok in zip(t.parent, t.tokens):
            col = P - 1 if par < 0 else P + par  # the prompt's last token predicts depth 0
            if col not in seen:
                seen[col] = len(rows)
                rows.append(b)
                cols.append(col)
            slot.append(seen[col])
            targets.append(tok)

    def t64(x):
        return torch.as_tensor(x, dtype=torch.int64)

    return _TrieRows(tokens, positions, mask, t64(rows), t64(cols), t64(slot), t64(targets))
