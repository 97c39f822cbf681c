"""The optimizer side of every stage: AdamW over the FSDP master shards, the lr schedule, and the
one guarded optimizer step.

Each stage starts a fresh AdamW with its own peak lr (`<section>.lr`, or `optim.lr` when 0) and
the schedule of the optim section (linear warm-up, then constant or cosine to min_lr_ratio).

NaN/inf guard (`optimizer_step`), so a bad step never reaches the weights:
- a micro-batch loss or the global gradient norm that is not finite skips the step on every rank
  (the norm is global, so all ranks agree) and zeroes the gradients;
- with `guard` (optim.guard_updates, default on), the step is applied to the fp32 master shards
  after a copy of them and of the AdamW state is taken; if any updated shard is not finite (on any
  rank: one all-reduced flag), the copy is restored: parameters and optimizer state untouched (the
  cause here is an update that overflows, e.g. a huge lr). The copy costs 3x the shard bytes per
  rank (params + 2 moments): cheap for the CPU presets, so the GPU configs may turn it off, and then
  a non-finite updated shard stops the run instead (the last checkpoint is intact: checkpoints
  refuse non-finite parameters).
Every skip is reported with its cause ("nonfinite_loss", "nonfinite_grad_norm",
"nonfinite_update"); the caller counts them apart from steps with nothing to learn from, and stops
the run after run.max_nonfinite_steps consecutive ones (`NonFiniteError`, a non-zero exit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from singleturn.trainer.dist import all_reduce_sum


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


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps, or a non-finite update without the guard's copy."""


@dataclass
class StepResult:
    grad_norm: float
    applied: bool
    cause: str = ""
    """Why the step was skipped: nonfinite_loss | nonfinite_grad_norm | nonfinite_update ('' if applied)."""


def _all_finite(tensors) -> bool:
    """Every tensor finite on every rank (one all-reduced flag: a host sync)."""
    bad = sum(int((~torch.isfinite(t)).any()) for t in tensors)
    return all_reduce_sum(float(bad)) == 0.0


def optimizer_step(
    fsdp, optimizer, *, lr: float, grad_clip: float, nonfinite: int, guard: bool = True
) -> StepResult:
    """Clip (global norm), then step unless a loss, the norm or (guard) the update is non-finite;
    always zero the grads. nonfinite: micro-batches whose loss was not finite (summed over ranks)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    norm = float(fsdp.clip_grad_norm_(grad_clip or float("inf")))  # global: every rank decides alike
    cause = "nonfinite_loss" if nonfinite else ("" if math.isfinite(norm) else "nonfinite_grad_norm")
    if not cause:
        params = fsdp.parameters()
        saved = _snapshot(params, optimizer) if guard else None
        try:
            optimizer.step()
            finite = _all_finite(params)
        except RuntimeError as e:  # AdamW's step size itself overflows fp32 (lr ~ 1e38)
            if "overflow" not in str(e) or saved is None:
                raise
            finite = False
        if not finite:
            if saved is None:
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteError(
                    "the optimizer step made a parameter non-finite (optim.guard_updates is off, so it "
                    "cannot be undone); the last checkpoint is intact: lower the lr and --resume"
                )
            _restore(saved, params, optimizer)
            cause = "nonfinite_update"
    optimizer.zero_grad(set_to_none=True)
    return StepResult(norm, not cause, cause)


@torch.no_grad()
def _snapshot(params, optimizer) -> tuple[list[torch.Tensor], dict]:
    state = {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in optimizer.state[p].items()}
        for p in params
        if p in optimizer.state
    }
    return [p.detach().clone() for p in params], state


@torch.no_grad()
def _restore(saved, params, optimizer) -> None:
    values, state = saved
    for p, v in zip(params, values):
        p.copy_(v)
    for p in params:
        if id(p) in state:
            optimizer.state[p] = state[id(p)]
        else:
            optimizer.state.pop(p, None)  # the first step created it: back to no state
