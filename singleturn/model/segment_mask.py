"""The attention mask of packed rows: `SegmentMask`, its one rule, and how it materializes.

`SegmentMask(segment[B,T], branch[B,T])` (int64): `segment` is the independent unit a token belongs
to (a GRPO group, an SFT example; -1 = padding), `branch` is 0 for the shared part and k >= 1 for
response k. Query q may attend key kv iff q == kv, or both are in one segment, kv <= q, and kv is
shared or on q's branch. `dense()` gives the bool [B, T, T] mask for SDPA; `block_mask()` a
FlexAttention BlockMask built from per-block summaries ([B, T/128, T/128] tables, never [T, T]);
`for_attention()` picks one for a device. The row layouts that produce these ids: `model.masks`;
the full description: docs/pieces.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # FlexAttention: torch >= 2.5 (older torch gets the dense mask)
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # pragma: no cover - depends on the torch version
    BlockMask = None

__all__ = ["SegmentMask", "FLEX_BLOCK_SIZE"]

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
    return BlockMask is not None


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
