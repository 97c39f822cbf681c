"""GRPO group-normalized advantages (and Dr. GRPO's unscaled variant) from per-sample rewards.

    rewards [B*G], group-major (group b is rows b*G .. b*G+G-1)
    mean_b  = mean_g r_bg
    std_b   = sqrt(sum_g (r_bg - mean_b)^2 / (G - 1))     (unbiased, as in TRL / DeepSeekMath)
    scale="std":  A_bg = (r_bg - mean_b) / (std_b + eps)   (GRPO, Shao et al. 2024)
    scale="none": A_bg =  r_bg - mean_b                    (Dr. GRPO, Liu et al. 2025)

A group whose rewards are all equal carries no learning signal: its advantages are exactly 0 (set
explicitly, because `r - mean` is not exactly 0 in floating point, e.g. three rewards of 0.1), and
G == 1 counts as such a group. Rewards are not differentiable, so there is no backward.
"""

from __future__ import annotations

import torch

from singleturn.kernels._backend import check_finite, interpreting, select_backend

try:  # Triton is optional on CPU installs; the PyTorch reference needs none of it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None

_SCALES = ("std", "none")


def _group_advantages_torch(rewards: torch.Tensor, group_size: int, scale: str, eps: float) -> torch.Tensor:
    r = rewards.double().view(-1, group_size)  # (B, G); fp64 so the reference is also the ground truth
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "std":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centered = centered / (std + eps)
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)  # zero-variance groups: exactly 0
    return torch.where(constant, 0.0, centered).float().view(-1)


if triton is not None:

    @triton.jit
    def _group_advantages_kernel(
        r_ptr,
        adv_ptr,
        num_groups,
        group_size,
        eps,
        SCALE_STD: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """A [BLOCK_B, BLOCK_G] tile of whole groups: mean, unbiased std, normalize, zero constant groups."""
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_g = tl.arange(0, BLOCK_G)
        mask = (offs_b[:, None] < num_groups) & (offs_g[None, :] < group_size)
        ptrs = offs_b[:, None] * group_size + offs_g[None, :]
        r = tl.load(r_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_G)
        mean = tl.sum(r, axis=1) / group_size
        centered = tl.where(mask, r - mean[:, None], 0.0)
        if SCALE_STD:
            var = tl.sum(centered * centered, axis=1) / tl.maximum(group_size - 1, 1)
            centered = centered / (tl.sqrt(var) + eps)[:, None]
        first = tl.sum(tl.where(offs_g[None, :] == 0, r, 0.0), axis=1)
        r_max = tl.max(tl.where(mask, r, -float("inf")), axis=1)
        r_min = tl.min(tl.where(mask, r, float("inf")), axis=1)
        constant = (r_max == first) & (r_min == first)
        adv = tl.where(constant[:, None], 0.0, centered)
        tl.store(adv_ptr + ptrs, adv, mask=mask)


def _group_advantages_triton(rewards: torch.Tensor, group_size: int, scale: str, eps: float) -> torch.Tensor:
    r = rewards.float().contiguous()
    adv = torch.empty_like(r)
    num_groups = r.numel() // group_size
    block_g = max(16, triton.next_power_of_2(group_size))
    block_b = max(1, min(64, 4096 // block_g)) if not interpreting() else 16
    grid = (triton.cdiv(num_groups, block_b),)
    _group_advantages_kernel[grid](r, adv, num_groups, group_size, eps, scale == "std", block_b, block_g)
    return adv


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: rewards[B*G] (group-major) -> adv[B*G] fp32, per-group centered (and /(std+eps)).

    scale="std" is GRPO, scale="none" Dr. GRPO. Constant groups (and G == 1) give exactly 0.
    Non-finite rewards raise ValueError (CPU) or fail a device assert (CUDA).
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be [B*G] with G={group_size} dividing it, got {tuple(rewards.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_finite("rewards", rewards)
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)
    if select_backend(rewards) == "triton":
        return _group_advantages_triton(rewards, group_size, scale, eps)
    return _group_advantages_torch(rewards, group_size, scale, eps)
