"""Packed-row layouts: GRPO groups that share their prompt, SFT examples packed by tokens, token trees.

A GRPO group is ONE row segment `[prompt | r_1 | ... | r_G]` under a tree mask, so the prompt
(~300 tokens) is computed once instead of once per short response; SFT examples of different
lengths are packed side by side (block-diagonal causal) instead of right-padded to the longest.
Each builder returns micro-batches of `PackedRows` (tokens, RoPE positions, a `SegmentMask`, and
the (row, col) -> target gather), sized by computed tokens B x T through `pack_by_tokens`. The mask
itself is `model.segment_mask`; the layouts, the attention rule and the trainer's use of
`PackedRows` are described in docs/pieces.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from singleturn.model.segment_mask import FLEX_BLOCK_SIZE, SegmentMask

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
        fits = (
            r
            for r in candidates
            if used[r] + n <= row_len and (items_per_row is None or len(rows[r]) < items_per_row)
        )
        r = next(fits, None)
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
    seq0, n = [], 0
    for _, responses in groups:
        seq0.append(n)
        n += len(responses)
    items = [_chain_item(trunk, members, groups, seq0) for trunk, members in _chains(groups)]
    out = []
    for p in _materialize(items, max_tokens, row_len, None, 1, "input", pad_id, device):
        # targets in response order, as the other builders give them
        order = torch.argsort(p.seq, stable=True)
        out.append(
            PackedRows(
                p.tokens, p.positions, p.mask, p.rows[order], p.cols[order], p.targets[order], p.seq[order]
            )
        )
    return out


def _chains(groups) -> list[tuple[list[int], list[int]]]:
    """(trunk ids, [group indices]) per chain: a group joins the first chain whose trunk its prompt
    is a prefix of, or extends (then its prompt becomes the trunk); else it starts a chain."""
    chains: list[list] = []  # [trunk ids, [group indices]], the trunk replaced as it grows
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
    return [(trunk, members) for trunk, members in chains]


def _chain_item(trunk: list[int], members: list[int], groups, seq0: list[int]) -> TreeItem:
    """One chain as a TreeItem: the trunk written once, each group's responses as branches right
    after the trunk token where its prompt ends (shortest prompt first)."""
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
    return item


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
        src = list(range(P - 1, P - 1 + n))
        items.append(TreeItem(ids, list(range(len(ids))), [0] * len(ids), src, list(completion), [e] * n))
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
            )
        )
    return out
