"""The `sft` stage: supervised fine-tuning on expert actions, cross-entropy over the action tokens
(+ the end-of-turn token) only.

One optimizer step = a global batch of states split evenly over ranks and into micro-batches.
For each micro-batch the model runs `hidden` over prompt+action, the hidden states at the positions
that predict action tokens are gathered (`h[rows, cols]`, N x D), and `kernels.token_logprobs` fuses
the LM head with the log-softmax so no [N, V] (let alone [B, T, V]) logits exist. The loss is the
summed negative log-likelihood divided by the GLOBAL number of action tokens (all-reduced before the
first micro-batch), and the FSDP gradients are summed over ranks: so the step equals one big batch
on one device, for any world size and micro-batch split. The passes run through the driver every
stage shares (trainer/forward_backward.py); this stage supplies the loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from singleturn.kernels import token_logprobs
from singleturn.model.masks import build_packed_causal_batch
from singleturn.trainer.data import PACK_PAD, Example, chunks, pack_completions
from singleturn.trainer.dist import all_reduce_sum
from singleturn.trainer.episode_data import EpisodeExample, episode_micro_batches
from singleturn.trainer.forward_backward import forward_backward, pad_for_ranks
from singleturn.trainer.stages.base import STAGES, Stage, StageContext, local_examples, register


def _micro_batches(examples: list, *, micro_batch_size, packing, max_tokens, row_len, device):
    """[(packed inputs, index of the micro-batch's first example)]: padded chunks of micro_batch_size
    examples, or (packing) block-diagonal causal rows of at most row_len tokens, max_tokens per
    micro-batch (model.masks: every example exactly once, in order, no padding between them).
    Episodes (trainer.episode_data.EpisodeExample): token trees packed by max_tokens, seq numbering
    the episodes' states in order."""
    if examples and isinstance(examples[0], EpisodeExample):
        return [
            (p, 0)
            for p in episode_micro_batches(examples, max_tokens=max_tokens, row_len=row_len, device=device)
        ]
    if not packing:
        out = []
        for k, mb in enumerate(chunks(examples, micro_batch_size)):
            packed = pack_completions([e.prompt_ids for e in mb], [e.target_ids for e in mb], device=device)
            out.append((packed, k * micro_batch_size))
        return out

    pairs = [(e.prompt_ids, e.target_ids) for e in examples]
    batches = build_packed_causal_batch(
        pairs, max_tokens=max_tokens, row_len=row_len, pad_id=PACK_PAD, device=device
    )
    return [(p, 0) for p in batches]  # seq is already the example's index in `examples`


def _counts(examples: list) -> tuple[int, int]:
    """(target tokens, states) of this rank's examples: an episode example counts each of its states."""
    if examples and isinstance(examples[0], EpisodeExample):
        return sum(len(e.item.targets) for e in examples), sum(len(e.states) for e in examples)
    return sum(len(e.target_ids) for e in examples), len(examples)


@dataclass
class _SFTPass:
    packed: object
    weight: float
    first: int
    """Index (in this rank's examples) of the pass's first example: packed.seq + first."""


def sft_forward_backward(
    model,
    head,
    examples: list[Example],
    *,
    micro_batch_size: int = 16,
    device,
    packing: bool = False,
    max_tokens: int = 8192,
    row_len: int | None = None,
    autocast=None,
) -> dict[str, float]:
    """Accumulate this rank's gradients for one SFT step (trainer.forward_backward); returns globally
    reduced statistics: loss (mean NLL per action token), action_prob (mean probability of the whole
    expert action under the model at T=1), num_tokens (global), nonfinite (passes with a NaN/inf loss).
    `head()` returns the (gathered) LM head weight [V, D] valid outside a module forward.
    """
    local_tokens, num_seq = _counts(examples)
    global_tokens = all_reduce_sum(float(local_tokens))  # host sync: the normalizer must be known up front
    mbs = _micro_batches(
        examples,
        micro_batch_size=micro_batch_size,
        packing=packing,
        max_tokens=max_tokens,
        row_len=row_len,
        device=device,
    )
    passes = pad_for_ranks(
        [_SFTPass(p, 1.0, first) for p, first in mbs], lambda: _SFTPass(mbs[0][0], 0.0, mbs[0][1])
    )
    seq_logp = torch.zeros(num_seq, dtype=torch.float64)  # (states,) summed action log-probs

    def nll(h_N: torch.Tensor, p: _SFTPass) -> tuple[torch.Tensor, dict]:
        logp_N = token_logprobs(h_N, head(), p.packed.targets)  # (N,)
        if p.weight:
            seq_logp.index_add_(0, p.packed.seq.cpu() + p.first, logp_N.detach().double().cpu())
        return -logp_N.sum(), {}

    stats = forward_backward(
        model,
        passes,
        nll,
        global_tokens=global_tokens,
        autocast=autocast,
        extra_sums=lambda: {"prob": float(seq_logp.exp().sum()), "n": num_seq},
    )
    return {
        "loss": stats["loss"],
        "action_prob": stats["prob"] / max(stats["n"], 1.0),
        "num_tokens": int(global_tokens),
        "nonfinite": int(stats["nonfinite"]),
    }


@register
class SFTStage(Stage):
    """One step = one global batch of expert states, loss on the expert action + end-of-turn."""

    name = section = "sft"
    label = "SFT"
    method = "SFT"
    kind = "supervised"
    log_keys = ("loss", "action_prob", "grad_norm", "tokens_per_s")
    plot_keys = {"loss": "loss", "accuracy": "action_prob"}

    trains_episodes = True
    """With data.prompt='episode' a step is batch_size whole expert episodes (ctx.episodes)."""

    def examples(self, ctx: StageContext, i: int) -> list:
        bs = getattr(ctx.cfg, self.section).batch_size
        if self.trains_episodes and ctx.episodes:
            return local_examples(ctx, i, bs, ctx.episodes)
        return local_examples(ctx, i, bs)

    def step(self, ctx: StageContext, i: int) -> dict:
        t0 = time.perf_counter()
        local = self.examples(ctx, i)
        sec = getattr(ctx.cfg, self.section)
        stats = sft_forward_backward(
            ctx.model,
            lambda: ctx.head,
            local,
            micro_batch_size=sec.micro_batch_size,
            packing=sec.packing,
            max_tokens=sec.max_tokens_per_micro_batch,
            row_len=ctx.cfg.data.max_seq_len,
            device=ctx.info.device,
            autocast=ctx.autocast,
        )
        self.postprocess(stats)
        lr = self.lr(ctx, i)
        norm, ok = ctx.apply_update(lr, stats["nonfinite"])
        dt = time.perf_counter() - t0
        tokens = all_reduce_sum(
            float(
                sum(
                    e.num_tokens if isinstance(e, EpisodeExample) else len(e.prompt_ids) + len(e.target_ids)
                    for e in local
                )
            )
        )
        return {
            **stats,
            "grad_norm": norm,
            "lr": lr,
            "skipped": not ok,
            "tokens_per_s": tokens / dt / ctx.info.world_size,
            "time_train": dt,
        }

    def postprocess(self, stats: dict) -> None:
        """Stage-specific edits of the statistics row (the lm stage drops action_prob)."""

    @classmethod
    def finish(cls, ctx: StageContext) -> None:
        """Export the SFT weights when a later stage needs them as its frozen reference."""
        later = ctx.cfg.run.stages[ctx.cfg.run.stages.index(cls.name) + 1 :]
        if any(STAGES[s].needs_reference(ctx.cfg) for s in later):
            ctx.export_once(ctx.reference_dir)
