"""GRPO policy loss over action tokens: fused log-probs, clipped surrogate, optional k3 KL, statistics.

Per action token: ratio = exp(clamp(logp - old_logp, -20, 20)) (clamped BEFORE exp), the clipped
surrogate -min(ratio * A, clip(ratio, 1 - eps_lo, 1 + eps_hi) * A), plus kl_coef * k3 against
ref_logp. The loss and statistics are SUMS over the micro-batch: the trainer divides by the global
action-token count, so micro-batches and ranks compose exactly. The Triton kernel emits
d loss / d logp in the forward pass. The formulas: docs/pieces.md (kernels/).

References: Shao et al. 2024 (DeepSeekMath, GRPO); Schulman 2020, "Approximating KL divergence";
Yu et al. 2025 (DAPO, asymmetric clip); TRL's GRPOTrainer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from singleturn.kernels._backend import check_finite, interpreting, select_backend
from singleturn.kernels.token_logprobs import IGNORE_INDEX, token_logprobs_and_entropy

try:  # Triton is optional on CPU installs; the PyTorch reference needs none of it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: finite in fp32, and far past any clip range


class GRPOLossOutput(NamedTuple):
    """Sums over the (non-ignored) action tokens; only `loss` is differentiable, the rest detached."""

    loss: torch.Tensor  # () fp32: sum of per-token surrogate (+ kl_coef * k3)
    clip_count: torch.Tensor  # () fp32: number of clipped tokens (a count, not a fraction)
    ratio: torch.Tensor  # () fp32: sum of ratios
    kl: torch.Tensor  # () fp32: sum of k3 (0 without ref_logp)
    entropy: torch.Tensor | None  # () fp32: sum of entropies, None unless compute_entropy
    num_tokens: torch.Tensor  # () int64: number of action tokens counted


def _surrogate_torch(logp, old_logp, advantages, ref_logp, valid, kl_coef, eps_lo, eps_hi):
    """Per-token loss [N] (differentiable in logp via autograd) and detached per-token stats."""
    c = LOG_RATIO_CLAMP
    ratio = torch.exp(torch.clamp(logp - old_logp, -c, c))
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_lo, 1.0 + eps_hi) * advantages
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        y = torch.clamp(ref_logp - logp, -c, c)
        kl = torch.exp(y) - y - 1.0
        loss = loss + kl_coef * kl
    zero = torch.zeros_like(logp)
    loss = torch.where(valid, loss, zero)
    is_clipped = valid & (clipped < unclipped)
    return (
        loss,
        is_clipped.float(),
        torch.where(valid, ratio, zero).detach(),
        torch.where(valid, kl, zero).detach(),
    )


if triton is not None:

    @triton.jit
    def _grpo_loss_fwd_kernel(
        logp_ptr,
        old_ptr,
        adv_ptr,
        ref_ptr,
        tgt_ptr,
        loss_ptr,
        dlogp_ptr,
        clipped_ptr,
        ratio_ptr,
        kl_ptr,
        N,
        ignore_index,
        eps_lo,
        eps_hi,
        kl_coef,
        clamp_val,
        HAS_REF: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Elementwise surrogate + k3 over BLOCK tokens; also d loss / d logp for the backward."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < N
        valid = in_range & (tl.load(tgt_ptr + offs, mask=in_range, other=ignore_index) != ignore_index)
        logp = tl.load(logp_ptr + offs, mask=valid, other=0.0)
        old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        x = logp - old
        x_c = tl.minimum(tl.maximum(x, -clamp_val), clamp_val)
        ratio = tl.exp(x_c)
        unclipped = ratio * adv
        clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_lo), 1.0 + eps_hi) * adv
        loss = -tl.minimum(unclipped, clipped)
        # Gradient flows through ratio only on the unclipped branch and inside the log-ratio clamp.
        dlogp = tl.where((unclipped <= clipped) & (x == x_c), -adv * ratio, 0.0)
        kl = tl.zeros_like(logp)
        if HAS_REF:
            ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            y = ref - logp
            y_c = tl.minimum(tl.maximum(y, -clamp_val), clamp_val)
            e = tl.exp(y_c)
            kl = e - y_c - 1.0
            loss += kl_coef * kl
            dlogp += tl.where(y == y_c, kl_coef * (1.0 - e), 0.0)
        tl.store(loss_ptr + offs, tl.where(valid, loss, 0.0), mask=in_range)
        tl.store(dlogp_ptr + offs, tl.where(valid, dlogp, 0.0), mask=in_range)
        tl.store(clipped_ptr + offs, tl.where(valid & (clipped < unclipped), 1.0, 0.0), mask=in_range)
        tl.store(ratio_ptr + offs, tl.where(valid, ratio, 0.0), mask=in_range)
        tl.store(kl_ptr + offs, tl.where(valid, kl, 0.0), mask=in_range)


class _SurrogateTritonFunction(torch.autograd.Function):
    """Per-token loss from the Triton kernel; backward is grad * (d loss / d logp) saved in forward."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, ref_logp, targets, ignore_index, kl_coef, eps_lo, eps_hi):
        N = logp.shape[0]
        loss, dlogp, clipped, ratio, kl = (
            torch.empty(N, dtype=torch.float32, device=logp.device) for _ in range(5)
        )
        block = 1024 if not interpreting() else 64
        has_ref = ref_logp is not None
        inputs = (logp, old_logp, advantages, ref_logp if has_ref else logp, targets)
        scalars = (N, ignore_index, eps_lo, eps_hi, kl_coef, LOG_RATIO_CLAMP)
        _grpo_loss_fwd_kernel[(triton.cdiv(N, block),)](
            *inputs, loss, dlogp, clipped, ratio, kl, *scalars, HAS_REF=has_ref, BLOCK=block
        )
        ctx.save_for_backward(dlogp)
        ctx.mark_non_differentiable(clipped, ratio, kl)
        return loss, clipped, ratio, kl

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (dlogp,) = ctx.saved_tensors
        return grad_loss * dlogp, None, None, None, None, None, None, None, None


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> GRPOLossOutput:
    """Summed GRPO clipped-surrogate loss over N action tokens (module docstring has the math).

    hidden [N, D], weight [V, D] (the LM head, one float dtype), targets [N] int (ignore_index rows
    excluded), advantages / old_logp / ref_logp [N] float (per token: the caller broadcasts each
    sequence's advantage). Returns GRPOLossOutput of sums; divide by the global token count.
    Non-finite advantages / old_logp / ref_logp raise ValueError (CPU) or a device assert (CUDA).
    """
    _check_args(hidden.shape[0], advantages, old_logp, ref_logp, clip_eps_low, clip_eps_high)
    valid = targets != ignore_index
    for name, t in (("advantages", advantages), ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None:
            check_finite(name, torch.where(valid, t, 0.0))
    logp, entropy = token_logprobs_and_entropy(
        hidden,
        weight,
        targets,
        temperature=temperature,
        ignore_index=ignore_index,
        compute_entropy=compute_entropy,
    )
    if select_backend(hidden) == "triton":
        ref = ref_logp.float().contiguous() if ref_logp is not None else None
        old, adv = old_logp.float().contiguous(), advantages.float().contiguous()
        consts = (int(ignore_index), float(kl_coef), float(clip_eps_low), float(clip_eps_high))
        loss, clipped, ratio, kl = _SurrogateTritonFunction.apply(
            logp, old, adv, ref, targets.contiguous(), *consts
        )
    else:
        ref = None if ref_logp is None else ref_logp.float()
        args = (logp, old_logp.float(), advantages.float(), ref, valid)
        loss, clipped, ratio, kl = _surrogate_torch(*args, kl_coef, clip_eps_low, clip_eps_high)
    return GRPOLossOutput(
        loss=loss.sum(),
        clip_count=clipped.detach().sum(),
        ratio=ratio.detach().sum(),
        kl=kl.detach().sum(),
        entropy=None if entropy is None else entropy.sum(),
        num_tokens=valid.sum(),
    )


def _check_args(N: int, advantages, old_logp, ref_logp, clip_eps_low: float, clip_eps_high: float) -> None:
    for name, t in (("advantages", advantages), ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None and t.shape != (N,):
            raise ValueError(f"{name} must be [N]=({N},), got {tuple(t.shape)}")
    if not (0.0 <= clip_eps_low < 1.0 and clip_eps_high >= 0.0):
        raise ValueError(
            f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {clip_eps_low}, {clip_eps_high}"
        )
