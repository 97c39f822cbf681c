"""The one forward/backward driver of every training stage (lm, sft, grpo, ppo, grpo-multiturn,
grpo-dagger) and its helpers: the hidden states at the positions that predict target tokens, rank
padding, and the reduction of the statistics. A stage supplies only its loss over those hidden states.

The loss of a step is sum over micro-batches of loss_fn(...) x weight / global_tokens, where
global_tokens counts the target tokens of every rank: so a step equals one big batch on one device,
for any world size and micro-batch split. Full text: docs/pieces.md ("trainer/forward_backward.py").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Protocol

import torch

from singleturn.kernels import token_logprobs
from singleturn.trainer.dist import all_reduce_max, all_reduce_sums


class Pass(Protocol):
    """One forward/backward: packed inputs (trainer.data.PackedBatch or model.masks.PackedRows) and
    its weight (1, or 0 for a rank-padding copy: exactly zero gradient, the FSDP collectives run)."""

    packed: object
    weight: float


LossFn = Callable[[torch.Tensor, Pass], tuple[torch.Tensor, dict[str, float]]]
"""loss_fn(h_N, pass) -> (the loss summed over the pass's N target tokens, statistics summed the same
way). h_N (N, D) are the hidden states at the positions predicting packed.targets."""


def hidden(model, packed) -> torch.Tensor:
    """model.hidden over padded rows (causal) or shared-prefix rows (positions + tree mask): (B, T, D)."""
    if getattr(packed, "mask", None) is None:
        return model.hidden(packed.tokens)
    return model.hidden(packed.tokens, positions=packed.positions, attn_mask=packed.mask)


def target_hidden(model, packed, autocast=None) -> torch.Tensor:
    """(N, D): the hidden states that predict packed.targets, the model forward under `autocast` (a
    context-manager factory, e.g. bf16 autocast, or None)."""
    with autocast() if autocast else contextlib.nullcontext():
        h = hidden(model, packed)
    return h[packed.rows, packed.cols]


def action_logprobs(model, head, packed) -> torch.Tensor:
    """logp[N] fp32 of packed.targets under the model (differentiable): hidden -> gather -> fused head.
    head() returns the (gathered) LM head weight [V, D]."""
    return token_logprobs(target_hidden(model, packed), head(), packed.targets)


def pad_for_ranks(passes: list, pad: Callable[[], Pass]) -> list:
    """`passes` extended with zero-weight passes from pad() to the largest count over ranks: FSDP
    needs every rank to run the same number of forward/backward passes."""
    n = all_reduce_max(len(passes))
    return passes + [pad() for _ in range(n - len(passes))]


def forward_backward(
    model,
    passes: list[Pass],
    loss_fn: LossFn,
    *,
    global_tokens: float,
    autocast=None,
    extra_sums: Callable[[], dict[str, float]] = dict,
) -> dict[str, float]:
    """Accumulate this rank's gradients over `passes`; returns the statistics summed over ranks:
    `loss` (the step's loss), `nonfinite` (passes with a NaN/inf loss), every key loss_fn returns
    (summed over weight-1 passes; 0 from padding passes) and every key of extra_sums() (called after
    the last pass), in one all-reduce."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    sums: dict[str, float] = {}
    nonfinite = 0
    for p in passes:
        out, stats = loss_fn(target_hidden(model, p.packed, autocast), p)
        loss = out * p.weight / global_tokens
        loss.backward()
        for k, v in stats.items():  # every key on every rank, also from a padding pass: one all-reduce
            sums[k] = sums.get(k, 0.0) + (float(v) if p.weight else 0.0)
        if not p.weight:
            continue
        d = loss.detach().double().cpu()
        nonfinite += 0 if math.isfinite(float(d)) else 1
        loss_sum += d
    return all_reduce_sums({"loss": float(loss_sum), "nonfinite": nonfinite, **sums, **extra_sums()})
