"""The optimizer side of every stage: AdamW over the FSDP master shards, the lr schedule, and the
one guarded optimizer step.

Each stage starts a fresh AdamW with its own peak lr (`<section>.lr`, or `optim.lr` when 0) and
the schedule of the optim section (linear warm-up, then constant or cosine to min_lr_ratio).

NaN/inf guard (`optimizer_step`): a micro-batch loss or a global gradient norm that is not finite
skips the optimizer step on every rank (the norm is global, so all ranks agree), zeroes the
gradients and is reported, so the weights and the optimizer state never see it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def make_optimizer(fsdp, optim_cfg, lr: float) -> torch.optim.AdamW:
    """AdamW over `fsdp.parameters()` (fp32 master shards) with the optim section's settings."""
    # foreach=False: the same per-tensor kernels on every rank count and resume (bitwise resume on CPU).
    return torch.optim.AdamW(
        fsdp.parameters(),
        lr=lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        foreach=False,
    )


def lr_at(optim_cfg, peak: float, i: int, total: int) -> float:
    """Learning rate of the i-th (0-based) optimizer step of a stage with `total` steps."""
    if optim_cfg.warmup_steps and i < optim_cfg.warmup_steps:
        return peak * (i + 1) / optim_cfg.warmup_steps
    if optim_cfg.schedule == "cosine" and total > optim_cfg.warmup_steps:
        t = (i - optim_cfg.warmup_steps) / max(total - optim_cfg.warmup_steps, 1)
        lo = optim_cfg.min_lr_ratio
        return peak * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t)))
    return peak


@dataclass
class StepResult:
    grad_norm: float
    applied: bool


def optimizer_step(fsdp, optimizer, *, lr: float, grad_clip: float, nonfinite: int) -> StepResult:
    """Clip (global norm), then step unless a loss or the norm is non-finite; always zero the grads.

    nonfinite: micro-batches whose loss was not finite (summed over ranks by the caller's stats).
    """
    for g in optimizer.param_groups:
        g["lr"] = lr
    norm = float(fsdp.clip_grad_norm_(grad_clip or float("inf")))  # global: every rank decides alike
    ok = nonfinite == 0 and math.isfinite(norm)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(norm, ok)
