"""The one policy update of every RL stage (grpo, ppo, grpo-multiturn) and of the train-step bench.

Given this rank's kept sequences (`trainer.policy_loss.PolicyBatch`: prompt, response, behaviour
log-probs, advantage), one update is:
  1. micro-batches (`trainer.policy_loss.Layout`): by default each group's prompt appears ONCE per
     row followed by its G responses (tree mask, positions restart after the prompt) and a
     micro-batch holds at most `max_tokens` computed tokens; `shared_prefix = false` is the padded
     reference path (one right-padded row per sequence, `micro_batch_size` sequences). Padded with
     zero-weight dummies to the max count over ranks (FSDP needs every rank to run the same number
     of forward/backward passes). Packed once, reused by the reference pass and every epoch;
  2. the frozen reference's log-probs of every response, when kl_coef > 0;
  3. the loss normalizer: the GLOBAL response-token count (all ranks, all micro-batches);
  4. `epochs` times: forward/backward of the clipped loss (kernels.grpo_loss) over all micro-batches,
     then the guarded optimizer step (trainer/optim.py: skipped on a non-finite loss or norm).
The returned statistics are reduced over ranks by name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from singleturn.trainer.policy_loss import (
    Layout,
    PolicyBatch,
    fill_reference_logprobs,
    global_response_tokens,
    grpo_forward_backward,
    micro_batches,
)


@dataclass(frozen=True)
class UpdateSettings:
    layout: Layout
    epochs: int
    clip_eps_low: float
    clip_eps_high: float
    kl_coef: float
    temperature: float
    """Temperature of the training log-probs (the rollout's)."""


def _untimed(name: str):
    return contextlib.nullcontext()


def policy_update(ctx, batch: PolicyBatch, settings: UpdateSettings, *, lr: float, timer=_untimed) -> dict:
    """Run the update on `ctx` (a trainer.stages.StageContext: model, fsdp, optimizer, ref, info).

    timer(name) -> a context manager around the phases "ref_logprobs", "fwd_bwd", "optimizer" (the
    train-step benchmark times them; the trainer does not). Returns loss / clip_frac / ratio / kl
    (of the last epoch), grad_norm, lr, skipped, num_tokens.
    """
    device = ctx.info.device
    mbs = micro_batches(batch, settings.layout, device=device)
    if settings.kl_coef > 0:
        with timer("ref_logprobs"):
            fill_reference_logprobs(
                ctx.ref,
                lambda: ctx.ref.output.weight,
                mbs,
                temperature=settings.temperature,
                autocast=ctx.autocast,
            )
    n_tok = global_response_tokens(batch)  # host sync: the normalizer must be known up front
    for _ in range(settings.epochs):
        with timer("fwd_bwd"):
            stats = grpo_forward_backward(
                ctx.model,
                lambda: ctx.head,
                mbs,
                global_tokens=n_tok,
                clip_eps_low=settings.clip_eps_low,
                clip_eps_high=settings.clip_eps_high,
                kl_coef=settings.kl_coef,
                temperature=settings.temperature,
                device=device,
                autocast=ctx.autocast,
            )
        with timer("optimizer"):
            norm, ok = ctx.apply_update(lr, stats["nonfinite"])
    return {**stats, "grad_norm": norm, "lr": lr, "skipped": not ok, "num_tokens": int(n_tok)}
