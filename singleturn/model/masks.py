"""Packed-row layouts and their attention masks: GRPO groups that share their prompt, SFT packed by tokens.

In single-turn GRPO a prompt (~300 tokens) is followed by G short responses (~8 tokens). Padding each
response into its own row repeats the prompt G times; here a group is ONE row segment
`[prompt | r_1 | ... | r_G]` under a tree mask, so the prompt is computed once. SFT examples of
different lengths are packed side by side instead of right-padded to the longest.

Layouts (one row; several items per row, then padding to the micro-batch's width T):

    shared prefix   [ p_0 .. p_{P-1} | r_1,0 .. r_1,n1-1 | ... | r_G,0 .. | next group ... | pad ]
      positions       0 .. P-1       |  P .. P+n1-1      | ... |  P ..    | 0 ..           | 0
      attention: a prompt token sees its group's earlier prompt tokens; a response token sees its
      group's prompt and its own earlier tokens, never another response or another group.
    packed causal   [ ex_1 | ex_2 | ... | pad ]: block-diagonal causal, positions restart at 0.

The mask object, `SegmentMask(segment[B,T], branch[B,T])` (int64), describes both: `segment` is the
independent unit a token belongs to (a GRPO group, an SFT example; -1 = padding), `branch` is 0 for
the shared part (the prompt; a whole causal example) and k >= 1 for response k. The rule:

    query q may attend key kv  <=>  q == kv  or  (segment[q] == segment[kv] >= 0  and  kv <= q
                                                  and  (branch[kv] == 0  or  branch[kv] == branch[q]))

(`q == kv` keeps every padding row non-empty, so SDPA never sees an all-masked row and returns no NaN.)
It materializes as `dense()`: a bool [B, T, T] for SDPA (CPU, tests, short rows), or as
`block_mask()`: a FlexAttention BlockMask built from per-block summaries of the ids (segment ranges,
branch ranges; [B, T/128, T/128] tables, never a [T, T] tensor) with the rule as its `mask_mod`.
`for_attention(T)` picks one: FlexAttention on CUDA for rows longer than one block, dense otherwise.
The model takes any of the three through `Transformer.hidden(tokens, positions=, attn_mask=)`.

The trainer's API (one call per policy update; micro-batches sized by computed tokens B x T):

    batches = build_shared_prefix_batch(groups, max_tokens=4096)   # groups: [(prompt, [resp, ...]), ...]
    for mb in batches:                                             # PackedRows
        h = model.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask)   # (B, T, D)
        logp_N = kernels.token_logprobs(h[mb.rows, mb.cols], head, mb.targets)   # (N,) fp32
        # mb.seq[n]: index of token n's response among all responses, flattened in input order
        # (group 0's responses 0..G0-1, then group 1's, ...), so per-sequence tensors gather by it.

PackedRows fields (N = response/target tokens in the micro-batch):
    tokens [B, T] int64, positions [B, T] int64, mask SegmentMask([B, T], [B, T]),
    rows [N], cols [N] int64 (the hidden state at (rows[n], cols[n]) predicts targets[n]),
    targets [N] int64, seq [N] int64.
`build_packed_causal_batch(examples, max_tokens=...)` takes (prompt, completion) pairs and gathers the
completion tokens exactly like `trainer.data.pack_completions`; for plain LM packing pass
(ids[:1], ids[1:]). `pack_by_tokens` is the packer both use: items fill rows of at most `row_len`
tokens (next fit in input order; or first fit decreasing with order="length", for ragged SFT), rows
fill micro-batches of at most `max_tokens` computed tokens; an item longer than the budget gets its
own row and micro-batch (never dropped).

References: PyTorch FlexAttention (`create_block_mask`, document masking, `BlockMask.from_kv_blocks`);
the shared-prefix / tree-attention packing of prompts with their sampled completions (e.g. verl's and
TRL's padding-free packing; vLLM's prefix sharing at inference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "SegmentMask",
    "PackedRows",
    "pack_by_tokens",
    "build_shared_prefix_batch",
    "build_packed_causal_batch",
    "build_tree_batch",
    "build_prefix_chain_batch",
    "TreeItem",
    "FLEX_BLOCK_SIZE",
]

# FlexAttention's default tile: the block mask has one entry per (128 queries, 128 keys) tile.
FLEX_BLOCK_SIZE = 128


def _allowed(q, kv, seg_q, seg_kv, br_q, br_kv):
    """The one attention rule (see the module docstring); broadcasting tensors in, bool out."""
    same = (seg_q == seg_kv) & (seg_q >= 0) & (kv <= q) & ((br_kv == 0) | (br_kv == br_q))
    return (q == kv) | same


@dataclass(frozen=True)
class SegmentMask:
    """Per-token ids of packed rows: segment [B, T] int64 (-1 = padding), branch [B, T] int64 (0 = shared).

    Every token must come after the tokens it attends to (a prompt before its responses): the rule
    compares flat column indices (`kv <= q`).
    """

    segment: torch.Tensor
    branch: torch.Tensor

    def __post_init__(self):
        if self.segment.dim() != 2 or self.segment.shape != self.branch.shape:
            raise ValueError(
                f"segment and branch must both be [B, T], got {tuple(self.segment.shape)}, "
                f"{tuple(self.branch.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.segment.shape)

    @property
    def device(self) -> torch.device:
        return self.segment.device

    def to(self, device) -> SegmentMask:
        return SegmentMask(self.segment.to(device), self.branch.to(device))

    def dense(self) -> torch.Tensor:
        """(B, T, T) bool, True where query i may attend key j (for SDPA's attn_mask)."""
        seg, br = self.segment, self.branch
        idx = torch.arange(seg.shape[1], device=seg.device)
        return _allowed(
            idx[:, None], idx[None, :], seg[:, :, None], seg[:, None, :], br[:, :, None], br[:, None, :]
        )

    def block_mask(self, block_size: int = FLEX_BLOCK_SIZE):
        """A FlexAttention BlockMask of this mask on its device: block tables + the rule as mask_mod.

        Built from per-block summaries (`_block_tables`), so the cost is O(B T + B (T/bs)^2), not O(B T^2).
        """
        from torch.nn.attention.flex_attention import BlockMask

        B, T = self.shape
        seg, br = _pad_to_blocks(self.segment, self.branch, block_size)  # (B, nb * bs)
        partial, full = _block_tables(seg, br, block_size)  # (B, nb, nb) bool each

        def mask_mod(b, h, q_idx, kv_idx):
            # The captured ids are padded to whole blocks, so indices in the last partial tile are valid.
            return _allowed(q_idx, kv_idx, seg[b, q_idx], seg[b, kv_idx], br[b, q_idx], br[b, kv_idx])

        num, idx = _ordered(partial[:, None])  # (B, 1, nb), (B, 1, nb, nb) int32
        fnum, fidx = _ordered(full[:, None])
        return BlockMask.from_kv_blocks(
            num, idx, fnum, fidx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(T, T)
        )

    def for_attention(self, device: torch.device | str | None = None):
        """What the attention layers consume on `device` (default: the mask's): a BlockMask for
        FlexAttention on CUDA when the rows are longer than one block, else the dense bool (B, T, T)."""
        device = torch.device(device) if device is not None else self.device
        mask = self.to(device) if device != self.device else self
        if device.type == "cuda" and mask.shape[1] > FLEX_BLOCK_SIZE and _has_flex():
            return mask.block_mask()
        return mask.dense()


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401  (torch >= 2.5)
    except ImportError:  # pragma: no cover - depends on the torch version
        return False
    return True


def _pad_to_blocks(segment, branch, bs: int):
    B, T = segment.shape
    Tp = -(-T // bs) * bs
    if Tp == T:
        return segment, branch
    seg = torch.full((B, Tp), -1, dtype=segment.dtype, device=segment.device)
    br = torch.zeros((B, Tp), dtype=branch.dtype, device=branch.device)
    seg[:, :T], br[:, :T] = segment, branch
    return seg, br


def _block_tables(seg: torch.Tensor, br: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) [B, nb, nb] bool tiles of the rule for ids seg, br [B, nb * bs].

    partial: tiles that may hold an allowed pair (the rule is applied inside them). A tile can only
    hold one if a segment occurs in both blocks, which implies their non-padding segment ranges
    [min, max] overlap: testing the overlap never drops a needed tile (exact when each segment is
    contiguous, as the builders make it). Diagonal tiles always count (padding attends itself).
    full: tiles where every pair is allowed, so the kernel skips the rule: strictly below the diagonal,
    both blocks one segment without padding, and the keys all shared (branch 0) or both blocks one
    branch. A tile that is full but not detected stays partial: slower, still exact.
    """
    B, Tp = seg.shape
    nb = Tp // bs
    s, r = seg.view(B, nb, bs), br.view(B, nb, bs)
    pad = s < 0
    big = torch.iinfo(s.dtype).max
    s_min = s.masked_fill(pad, big).amin(-1)  # (B, nb); big for an all-padding block
    s_max = s.masked_fill(pad, -1).amax(-1)  # (B, nb); -1 for an all-padding block
    b_min, b_max = r.amin(-1), r.amax(-1)
    blk = torch.arange(nb, device=seg.device)
    below = blk[:, None] > blk[None, :]  # (nb_q, nb_kv): kv block strictly before q block
    diag = blk[:, None] == blk[None, :]
    overlap = (s_min[:, :, None] <= s_max[:, None, :]) & (s_min[:, None, :] <= s_max[:, :, None])
    partial = (overlap & (below | diag)) | diag
    one_seg = ~pad.any(-1) & (s_min == s_max)  # (B, nb)
    one_branch = b_min == b_max
    keys_shared = b_max[:, None, :] == 0
    same_branch = one_branch[:, :, None] & one_branch[:, None, :] & (b_min[:, :, None] == b_min[:, None, :])
    full = (
        below
        & one_seg[:, :, None]
        & one_seg[:, None, :]
        & (s_min[:, :, None] == s_min[:, None, :])
        & (keys_shared | same_branch)
    )
    return partial & ~full, full


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense tile table (B, H, nq, nk) bool -> (count (B, H, nq), kv indices (B, H, nq, nk)) int32."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


@dataclass
class PackedRows:
    """One micro-batch of packed rows (see the module docstring for the layouts).

    The hidden state at (rows[n], cols[n]) predicts targets[n]; seq[n] is the index of token n's
    sequence (a response; an example) among all the builder's inputs, in input order.
    """

    tokens: torch.Tensor  # (B, T) int64
    positions: torch.Tensor  # (B, T) int64, RoPE positions
    mask: SegmentMask  # ids (B, T)
    rows: torch.Tensor  # (N,) int64
    cols: torch.Tensor  # (N,) int64
    targets: torch.Tensor  # (N,) int64
    seq: torch.Tensor  # (N,) int64

    @property
    def num_tokens(self) -> int:
        """Target tokens N (what the loss sums over)."""
        return int(self.targets.numel())

    @property
    def computed_tokens(self) -> int:
        """B x T: the tokens the forward computes, padding included."""
        return int(self.tokens.numel())

    def to(self, device) -> PackedRows:
        return PackedRows(
            self.tokens.to(device),
            self.positions.to(device),
            self.mask.to(device),
            *(t.to(device) for t in (self.rows, self.cols, self.targets, self.seq)),
        )


@dataclass
class TreeItem:
    """One segment of a row, before placement: tokens/positions/branch of equal length; src/targets/seq
    of equal length (one entry per target). Any token tree written in an order where every token
    follows what it attends to: branch 0 is the trunk, a branch k >= 1 token sees its own branch and
    the trunk tokens placed before it (so a branch written mid-trunk sees only the trunk so far)."""

    tokens: list[int]
    positions: list[int]
    branch: list[int]
    src: list[int]  # slot (relative to the item's start) whose hidden state predicts targets[n]
    targets: list[int]
    seq: list[int]


def pack_by_tokens(
    lengths: Sequence[int],
    *,
    max_tokens: int,
    row_len: int | None = None,
    items_per_row: int | None = None,
    pad_to: int = 1,
    order: str = "input",
) -> list[list[list[int]]]:
    """Item lengths -> micro-batches -> rows -> item indices, every item exactly once.

    Rows hold at most `row_len` tokens (default max_tokens) and `items_per_row` items (default
    unbounded). order="input": next fit in input order, micro-batches consecutive in input order.
    order="length": first fit decreasing (longest item first, into the first row it fits), rows
    grouped longest first: fewer rows and less padding for ragged lengths (SFT), items out of order.
    Micro-batches: rows while rows x width <= max_tokens, the width being the longest row rounded up
    to a multiple of `pad_to`. An item longer than row_len is a row of its own, and a row wider than
    max_tokens a micro-batch of its own: never dropped.
    """
    row_len = max_tokens if row_len is None else row_len
    if max_tokens < 1 or row_len < 1 or pad_to < 1 or (items_per_row is not None and items_per_row < 1):
        raise ValueError(f"bad budget: max_tokens={max_tokens} row_len={row_len} pad_to={pad_to}")
    if order not in ("input", "length"):
        raise ValueError(f"order must be 'input' or 'length', got {order!r}")
    rows: list[list[int]] = []
    used: list[int] = []
    if order == "input":
        items = list(range(len(lengths)))
    else:
        items = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    for i in items:
        n = lengths[i]
        candidates = range(max(len(rows) - 1, 0), len(rows)) if order == "input" else range(len(rows))
        r = next(
            (r for r in candidates if used[r] + n <= row_len and (items_per_row is None or len(rows[r]) < items_per_row)),
            None,
        )  # fmt: skip
        if r is None:
            rows.append([i])
            used.append(n)
        else:
            rows[r].append(i)
            used[r] += n
    if order == "length":  # longest rows first, so each micro-batch's rows are alike in width
        by_len = sorted(range(len(rows)), key=lambda k: -used[k])
        rows, used = [rows[k] for k in by_len], [used[k] for k in by_len]
    batches: list[list[list[int]]] = []
    width = 0
    for row, n in zip(rows, used):
        w = max(width, -(-n // pad_to) * pad_to)
        if batches and (len(batches[-1]) + 1) * w <= max_tokens:
            batches[-1].append(row)
            width = w
        else:
            batches.append([row])
            width = -(-n // pad_to) * pad_to
    return batches


def build_shared_prefix_batch(
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    max_tokens: int,
    row_len: int | None = None,
    items_per_row: int | None = None,
    pad_to: int = 1,
    order: str = "input",
    pad_id: int = 0,
    device: torch.device | str = "cpu",
) -> list[PackedRows]:
    """GRPO groups (prompt ids, [response ids, ...]) -> micro-batches of shared-prefix rows.

    Each group is one segment [prompt | r_1 | ... | r_G] (never split across rows); response j's
    token k sits at RoPE position P + k and is predicted by the prompt's last token (k = 0) or by its
    own token k - 1. seq numbers the responses in input order across groups (whatever the placement).
    Budgets and `order`: `pack_by_tokens`.
    Empty responses are allowed (they add no tokens); empty prompts and groups without responses are not.
    """
    items, seq0 = [], 0
    for g, (prompt, responses) in enumerate(groups):
        if len(prompt) == 0 or len(responses) == 0:
            raise ValueError(f"group {g}: needs a non-empty prompt and at least one response")
        P = len(prompt)
        item = TreeItem(list(prompt), list(range(P)), [0] * P, [], [], [])
        for j, resp in enumerate(responses):
            at = len(item.tokens)
            n = len(resp)
            item.tokens += list(resp)
            item.positions += range(P, P + n)
            item.branch += [j + 1] * n
            item.src += ([P - 1] + list(range(at, at + n - 1))) if n else []
            item.targets += list(resp)
            item.seq += [seq0 + j] * n
        seq0 += len(responses)
        items.append(item)
    return _materialize(items, max_tokens, row_len, items_per_row, pad_to, order, pad_id, device)


def build_prefix_chain_batch(
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    max_tokens: int,
    row_len: int | None = None,
    pad_id: int = 0,
    device: torch.device | str = "cpu",
) -> list[PackedRows]:
    """GRPO groups whose prompts extend one another -> one segment per chain, every prompt token once.

    In the append-only episode format a state's prompt is a prefix of every later state's prompt of
    the same episode (and a multi-turn rollout's turn t prompt a prefix of turn t+1's). Groups are
    chained in input order: a group joins the first chain whose longest prompt (the trunk) it is a
    prefix of, or extends. A chain is one segment: the trunk written once, and each group's responses
    as branches placed right after the trunk token where the group's prompt ends (RoPE positions
    P + k; under the tree mask a branch sees the trunk before it and itself, no later trunk token and
    no other branch sees it). A group that chains with no other is exactly `build_shared_prefix_batch`'s
    segment. seq numbers the responses in input order and the targets come in that order (a response's
    tokens consecutive); micro-batches: `pack_by_tokens` in chain order.
    """
    chains: list[list] = []  # [trunk ids, [group indices]]
    for g, (prompt, responses) in enumerate(groups):
        if len(prompt) == 0 or len(responses) == 0:
            raise ValueError(f"group {g}: needs a non-empty prompt and at least one response")
        p = list(prompt)
        for chain in chains:
            trunk = chain[0]
            if len(p) <= len(trunk) and trunk[: len(p)] == p:
                chain[1].append(g)
                break
            if len(p) > len(trunk) and p[: len(trunk)] == trunk:
                chain[0] = p
                chain[1].append(g)
                break
        else:
            chains.append([p, [g]])
    seq0, n = [], 0
    for _, responses in groups:
        seq0.append(n)
        n += len(responses)
    items = []
    for trunk, members in chains:
        item = TreeItem([], [], [], [], [], [])
        flat: list[int] = []  # flat slot of trunk token k
        written, branch = 0, 0
        for g in sorted(members, key=lambda g: (len(groups[g][0]), g)):
            P = len(groups[g][0])
            flat += range(len(item.tokens), len(item.tokens) + P - written)
            item.tokens += trunk[written:P]
            item.positions += range(written, P)
            item.branch += [0] * (P - written)
            written = P
            for j, resp in enumerate(groups[g][1]):
                branch += 1
                at, k = len(item.tokens), len(resp)
                item.tokens += list(resp)
                item.positions += range(P, P + k)
                item.branch += [branch] * k
                item.src += ([flat[P - 1]] + list(range(at, at + k - 1))) if k else []
                item.targets += list(resp)
                item.seq += [seq0[g] + j] * k
        items.append(item)
    out = []
    for p in _materialize(items, max_tokens, row_len, None, 1, "input", pad_id, device):
        order = torch.argsort(
            p.seq, stable=True
        )  # targets in response order, as the other builders give them
        out.append(PackedRows(p.tokens, p.positions, p.mask, p.rows[order], p.cols[order], p.targets[order],
                              p.seq[order]))  # fmt: skip
    return out


def build_packed_causal_batch(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_tokens: int,
    row_len: int | None = None,
    items_per_row: int | None = None,
    pad_to: int = 1,
    order: str = "input",
    pad_id: int = 0,
    device: torch.device | str = "cpu",
) -> list[PackedRows]:
    """(prompt ids, completion ids) pairs -> micro-batches of block-diagonal causal rows.

    Each example is one causal segment at positions 0..L-1; its completion tokens are the targets,
    each predicted by the previous slot (as in `trainer.data.pack_completions`); seq = example index.
    """
    items = []
    for e, (prompt, completion) in enumerate(examples):
        if len(prompt) == 0:
            raise ValueError(f"example {e} has an empty prompt")
        ids = list(prompt) + list(completion)
        P, n = len(prompt), len(completion)
        items.append(TreeItem(ids, list(range(len(ids))), [0] * len(ids), list(range(P - 1, P - 1 + n)),
                           list(completion), [e] * n))  # fmt: skip
    return _materialize(items, max_tokens, row_len, items_per_row, pad_to, order, pad_id, device)


def build_tree_batch(
    items: Sequence[TreeItem],
    *,
    max_tokens: int,
    row_len: int | None = None,
    items_per_row: int | None = None,
    pad_to: int = 1,
    order: str = "input",
    pad_id: int = 0,
    device: torch.device | str = "cpu",
) -> list[PackedRows]:
    """Arbitrary `TreeItem`s (e.g. a whole episode with per-turn branches) -> micro-batches of rows;
    seq is taken from the items as given. Budgets and `order`: `pack_by_tokens`."""
    for k, it in enumerate(items):
        if not (len(it.tokens) == len(it.positions) == len(it.branch)) or not (
            len(it.src) == len(it.targets) == len(it.seq)
        ):
            raise ValueError(f"item {k}: tokens/positions/branch or src/targets/seq differ in length")
        if it.src and not 0 <= min(it.src) <= max(it.src) < len(it.tokens):
            raise ValueError(f"item {k}: a target's source slot lies outside the item")
    return _materialize(list(items), max_tokens, row_len, items_per_row, pad_to, order, pad_id, device)


def _materialize(
    items, max_tokens, row_len, items_per_row, pad_to, order, pad_id, device
) -> list[PackedRows]:
    """Place items into rows (pack_by_tokens), pad each micro-batch to its width, build the tensors."""
    plan = pack_by_tokens(
        [len(it.tokens) for it in items],
        max_tokens=max_tokens,
        row_len=row_len,
        items_per_row=items_per_row,
        pad_to=pad_to,
        order=order,
    )
    out = []
    for batch in plan:
        widths = [sum(len(items[i].tokens) for i in row) for row in batch]
        B, T = len(batch), -(-max(widths) // pad_to) * pad_to
        tokens = torch.full((B, T), pad_id, dtype=torch.int64)
        positions = torch.zeros((B, T), dtype=torch.int64)
        segment = torch.full((B, T), -1, dtype=torch.int64)
        branch = torch.zeros((B, T), dtype=torch.int64)
        rows, cols, targets, seq = [], [], [], []
        for b, row in enumerate(batch):
            at = 0
            for s, i in enumerate(row):  # segment ids are local to the row, in order
                it = items[i]
                n = len(it.tokens)
                tokens[b, at : at + n] = torch.as_tensor(it.tokens, dtype=torch.int64)
                positions[b, at : at + n] = torch.as_tensor(it.positions, dtype=torch.int64)
                segment[b, at : at + n] = s
                branch[b, at : at + n] = torch.as_tensor(it.branch, dtype=torch.int64)
                rows += [b] * len(it.src)
                cols += [at + c for c in it.src]
                targets += it.targets
                seq += it.seq
                at += n

        def t(x):
            return torch.as_tensor(x, dtype=torch.int64, device=device)

        out.append(
            PackedRows(
                tokens.to(device),
                positions.to(device),
                SegmentMask(segment.to(device), branch.to(device)),
                t(rows),
                t(cols),
                t(targets),
                t(seq),
            )  # fmt: skip
        )
    return out
