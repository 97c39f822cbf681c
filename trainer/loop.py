"""The training loop: stages (SFT, single-turn GRPO) over one global step counter, with evaluation,
sharded checkpoints, exact resume and metrics.

Global steps: SFT steps 1..S, then GRPO rollout batches S+1..S+G (each with grpo.ppo_epochs
optimizer steps). Each stage starts a fresh AdamW (its own lr); a checkpoint stores the FSDP
shards, the optimizer, the RNG states and the step, so `--resume` continues mid-stage with the
same batches (sampling is a pure function of the step) and the same rollouts (seeded per step and
rank): on CPU the resumed losses equal the uninterrupted run's bit for bit.

NaN/inf guard: a micro-batch loss or a global gradient norm that is not finite skips the optimizer
step on every rank (the norm is global, so all ranks agree), zeroes the gradients and is counted;
the weights, the optimizer state and therefore the checkpoints never see it.
"""

from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data import Example, batch_indices, rank_slice
from trainer.dist import all_reduce_sum
from trainer.grpo import (
    fill_reference_logprobs,
    global_response_tokens,
    grpo_forward_backward,
    micro_batches,
    select_sequences,
)
from trainer.reward import expert_match_rewards
from trainer.rollout import rollout_seed, sample_responses
from trainer.sft import sft_forward_backward

# Right padding of packed training sequences: any in-vocabulary id works (causal attention keeps it
# invisible and it is never a target); the tokenizer's pad id may lie outside the embedding.
_PACK_PAD = 0


@dataclass
class StageSpan:
    name: str
    first: int
    last: int


_SECTION = {"grpo-multiturn": "ppo"}  # stage -> config section, where they differ


def stage_spans(cfg) -> list[StageSpan]:
    """Global step ranges of the configured stages, in order."""
    spans, step = [], 0
    for name in cfg.run.stages:
        n = getattr(cfg, _SECTION.get(name, name)).steps
        spans.append(StageSpan(name, step + 1, step + n))
        step += n
    return spans


def lr_at(optim_cfg, peak: float, i: int, total: int) -> float:
    """Learning rate of the i-th (0-based) optimizer step of a stage with `total` steps."""
    if optim_cfg.warmup_steps and i < optim_cfg.warmup_steps:
        return peak * (i + 1) / optim_cfg.warmup_steps
    if optim_cfg.schedule == "cosine" and total > optim_cfg.warmup_steps:
        t = (i - optim_cfg.warmup_steps) / max(total - optim_cfg.warmup_steps, 1)
        lo = optim_cfg.min_lr_ratio
        return peak * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t)))
    return peak


def make_optimizer(fsdp, optim_cfg, lr: float) -> torch.optim.AdamW:
    # foreach=False: the same per-tensor kernels on every rank count and resume (bitwise resume on CPU).
    return torch.optim.AdamW(
        fsdp.parameters(),
        lr=lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        foreach=False,
    )


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process RSS)


class StepRunner:
    """One optimizer step for either stage (forward/backward, clip, NaN guard, AdamW)."""

    def __init__(self, *, model, fsdp, tokenizer, examples, cfg, info, ref=None):
        self.model, self.fsdp, self.tokenizer, self.examples = model, fsdp, tokenizer, examples
        self.cfg, self.info, self.ref = cfg, info, ref
        self.optimizer: torch.optim.AdamW | None = None
        self.skipped_steps = 0
        self.head = lambda: model.output.weight  # the sticky head unit: full weight after hidden()

    def _local_examples(self, step_in_stage: int, batch_size: int):
        idx = batch_indices(step_in_stage, batch_size, len(self.examples), self.cfg.data.seed)
        return [self.examples[i] for i in rank_slice(idx, self.info.rank, self.info.world_size)]

    def _apply_update(self, lr: float, nonfinite: int) -> tuple[float, bool]:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = float(self.fsdp.clip_grad_norm_(clip))  # global over ranks: every rank decides alike
        ok = nonfinite == 0 and math.isfinite(norm)
        if ok:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return norm, ok

    def sft_step(self, step_in_stage: int, total: int, *, lm: bool = False) -> dict:
        """One SFT step (loss on the expert action + eot), or with lm=True one LM warm-up step (loss
        on every token after the first: the rendered prompt and the action)."""
        c = self.cfg
        stage_cfg = c.lm if lm else c.sft
        t0 = time.perf_counter()
        local = self._local_examples(step_in_stage, stage_cfg.batch_size)
        if lm:
            local = [Example(e.prompt_ids[:1], e.prompt_ids[1:] + e.target_ids, e.state) for e in local]
        stats = sft_forward_backward(
            self.model,
            self.head,
            local,
            micro_batch_size=stage_cfg.micro_batch_size,
            pad_id=_PACK_PAD,
            device=self.info.device,
        )
        if lm:
            stats.pop("action_prob")  # the probability of a whole prompt says nothing
        lr = lr_at(c.optim, stage_cfg.lr or c.optim.lr, step_in_stage, total)
        norm, ok = self._apply_update(lr, stats["nonfinite"])
        dt = time.perf_counter() - t0
        tokens = all_reduce_sum(float(sum(len(e.prompt_ids) + len(e.target_ids) for e in local)))
        return {
            **stats,
            "grad_norm": norm,
            "lr": lr,
            "skipped": not ok,
            "tokens_per_s": tokens / dt / self.info.world_size,
            "time_train": dt,
        }

    def grpo_step(self, step: int, step_in_stage: int, total: int) -> dict:
        c, G = self.cfg, self.cfg.rollout.group_size
        pool = c.grpo.batch_size * c.grpo.oversample
        local = self._local_examples(step_in_stage, pool)
        t0 = time.perf_counter()
        roll = sample_responses(
            self.model,
            self.fsdp,
            self.tokenizer,
            [e.prompt_ids for e in local],
            c.rollout,
            seed=rollout_seed(c.run.seed, step, self.info.rank),
        )
        rew = expert_match_rewards(roll.texts, [e.state for e in local], G)
        batch = select_sequences(
            roll.prompts,
            roll.responses,
            roll.logprobs,
            rew.rewards,
            G,
            adv_scale=c.grpo.adv_scale,
            # per rank: its share of batch_size (the pool is rank-sliced the same way)
            max_groups=None if c.grpo.oversample == 1 else c.grpo.batch_size // self.info.world_size,
        )
        t_roll = time.perf_counter() - t0
        r = rew.rewards.view(-1, G)
        sums = all_reduce_sum(
            torch.tensor(
                [
                    float(r.sum()),
                    float(r.numel()),
                    float((r.max(1).values > 0).sum()),
                    float(r.shape[0]),
                    float(rew.unparseable),
                    float(batch.zero_var_groups),
                    float(len(batch.sequences)),
                    float(sum(len(x) for x in roll.responses)),
                ],
                dtype=torch.float64,
            )
        )
        row = {
            "reward_mean": float(sums[0] / sums[1]),
            "action_accuracy": float(sums[0] / sums[1]),
            "pass_at_g": float(sums[2] / sums[3]),
            "unparseable_frac": float(sums[4] / sums[1]),
            "zero_var_groups": int(sums[5]),
            "groups": int(sums[3]),
            "kept_sequences": int(sums[6]),
            "response_len": float(sums[7] / sums[1]),
            "time_rollout": t_roll,
        }
        t1 = time.perf_counter()
        if int(sums[6]) == 0:
            # Every group had zero reward variance: nothing to learn from this batch.
            row.update(skipped=True, skip_reason="all_groups_zero_variance", loss=0.0, clip_frac=0.0, kl=0.0)
            self.skipped_steps += 1
        else:
            mbs = micro_batches(batch, c.grpo.micro_batch_size)
            kw = dict(pad_id=_PACK_PAD, device=self.info.device)
            if c.grpo.kl_coef > 0:
                fill_reference_logprobs(
                    self.ref,
                    lambda: self.ref.output.weight,
                    batch,
                    micro_batch_size=c.grpo.micro_batch_size,
                    temperature=c.rollout.temperature,
                    **kw,
                )
            n_tok = global_response_tokens(batch)
            lr = lr_at(c.optim, c.grpo.lr or c.optim.lr, step_in_stage, total)
            for _ in range(c.grpo.ppo_epochs):
                stats = grpo_forward_backward(
                    self.model,
                    self.head,
                    mbs,
                    global_tokens=n_tok,
                    clip_eps_low=c.grpo.clip_eps_low,
                    clip_eps_high=c.grpo.clip_eps_high,
                    kl_coef=c.grpo.kl_coef,
                    temperature=c.rollout.temperature,
                    **kw,
                )
                norm, ok = self._apply_update(lr, stats["nonfinite"])
            row.update(stats, grad_norm=norm, lr=lr, skipped=not ok, num_tokens=int(n_tok))
        t_train = time.perf_counter() - t1
        seq_tokens = sum(len(s.prompt) + len(s.response) for s in batch.sequences) * c.grpo.ppo_epochs
        row.update(time_train=t_train, tokens_per_s=seq_tokens / max(t_train, 1e-9))
        return row
