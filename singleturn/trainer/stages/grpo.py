"""The `grpo` stage: single-turn GRPO from expert states, the paper's method.

One step = one rollout batch: `grpo.batch_size * grpo.oversample` expert states (a pure function
of the step, like SFT's batches), G = rollout.group_size sampled responses each with the gathered
full weights (`fsdp.summon_full_params`: each prompt prefilled once, its KV cache shared by its G
rows), reward r = 1{parse_action(response) == expert action} (trainer/reward.py), group
advantages with zero-variance groups dropped (counted; with oversample > 1 the first batch_size
informative groups are kept: dynamic sampling), then the shared policy update (trainer/update.py).

Sampling seeds are a pure function of (run seed, global step, rank): a resumed run draws the same
responses as the uninterrupted one.
"""

from __future__ import annotations

import time

import torch

from singleturn.model import load_hf_checkpoint
from singleturn.model.generate import plan_chunks
from singleturn.model.policy import DTYPES, sample_completions
from singleturn.trainer.data import Example
from singleturn.trainer.dist import all_reduce_sums
from singleturn.trainer.fsdp import apply_fsdp
from singleturn.trainer.policy_loss import select_sequences
from singleturn.trainer.prepare import build_model
from singleturn.trainer.reward import expert_match_rewards
from singleturn.trainer.rollout import rollout_dtype, rollout_seed
from singleturn.trainer.stages.base import Stage, StageContext, StageSpan, local_examples, register
from singleturn.trainer.update import UpdateSettings, policy_update


@register
class GRPOStage(Stage):
    name = section = "grpo"
    label = "SFT+GRPO"
    method = "GRPO (single-turn)"
    kind = "rl"
    log_keys = ("loss", "reward_mean", "pass_at_g", "zero_var_groups", "clip_frac", "kl", "response_len")
    plot_keys = {"loss": "loss", "reward": "reward_mean", "accuracy": "action_accuracy"}

    def __init__(self, ctx: StageContext, span: StageSpan):
        super().__init__(ctx, span)
        if self.needs_reference(ctx.cfg):
            ctx.ref = build_reference(ctx)

    @classmethod
    def needs_reference(cls, cfg) -> bool:
        return cfg.grpo.kl_coef > 0

    @classmethod
    def samples_per_step(cls, cfg) -> int:
        return cfg.grpo.batch_size * cfg.grpo.oversample * cfg.rollout.group_size  # all drawn, kept or not

    @classmethod
    def samples(cls, cfg, rows: list[dict]) -> int:
        return sum(int(r.get("groups", 0)) * cfg.rollout.group_size for r in rows)

    def batch(self, ctx: StageContext, i: int) -> list[Example]:
        """This rank's rollout states of step i: expert states (grpo-dagger mixes in the policy's own)."""
        return local_examples(ctx, i, ctx.cfg.grpo.batch_size * ctx.cfg.grpo.oversample)

    def step(self, ctx: StageContext, i: int) -> dict:
        c, G = ctx.cfg, ctx.cfg.rollout.group_size
        local = self.batch(ctx, i)
        t0 = time.perf_counter()
        done, chunks = self._sample(ctx, i, local)
        rew = expert_match_rewards([d.text for d in done], [e.state for e in local], G)
        batch = select_sequences(
            [e.prompt_ids for e in local],
            [d.tokens for d in done],
            [d.logprobs for d in done],
            rew.rewards,
            G,
            adv_scale=c.grpo.adv_scale,
            keep_zero_variance=c.grpo.train_zero_variance,
            # per rank: its share of batch_size (the pool is rank-sliced the same way)
            max_groups=None if c.grpo.oversample == 1 else c.grpo.batch_size // ctx.info.world_size,
        )
        t_roll = time.perf_counter() - t0
        row = {**_rollout_row(rew, batch, done, G, chunks), "time_rollout": t_roll}
        t1 = time.perf_counter()
        if row["kept_sequences"] == 0:
            # Every group had zero reward variance: nothing to learn from this batch.
            row.update(skipped=True, skip_reason="all_groups_zero_variance", loss=0.0, clip_frac=0.0, kl=0.0)
            ctx.skipped_steps += 1
        else:
            settings = UpdateSettings(
                layout=ctx.layout(c.grpo),
                epochs=c.grpo.ppo_epochs,
                clip_eps_low=c.grpo.clip_eps_low,
                clip_eps_high=c.grpo.clip_eps_high,
                kl_coef=c.grpo.kl_coef,
                temperature=c.rollout.temperature,
            )
            row.update(policy_update(ctx, batch, settings, lr=self.lr(ctx, i)))
        t_train = time.perf_counter() - t1
        seq_tokens = sum(len(s.prompt) + len(s.response) for s in batch.sequences) * c.grpo.ppo_epochs
        row.update(time_train=t_train, tokens_per_s=seq_tokens / max(t_train, 1e-9))
        return row

    def _sample(self, ctx: StageContext, i: int, local: list[Example]) -> tuple[list, int]:
        """G sampled responses per state of `local` (`Completion`s, grouped by state), from the full
        weights gathered in rollout.dtype, each batch's KV cache within rollout.max_cache_mb; and the
        number of chunks that took (1 when it fits; logged as rollout_chunks, summed over ranks)."""
        c = ctx.cfg
        bound = c.rollout.max_cache_mb << 20
        prompts = [e.prompt_ids for e in local]
        with ctx.fsdp.summon_full_params(dtype=rollout_dtype(c)):
            G, new = c.rollout.group_size, c.rollout.max_new_tokens
            chunks = len(plan_chunks(ctx.model, prompts, G, new, bound))
            done = sample_completions(
                ctx.model,
                ctx.tokenizer,
                prompts,
                num_samples=G,
                max_new_tokens=new,
                temperature=c.rollout.temperature,
                top_p=c.rollout.top_p,
                top_k=c.rollout.top_k,
                seed=rollout_seed(c.run.seed, self.span.first + i, ctx.info.rank),
                max_cache_bytes=bound,
            )
        return done, chunks


def _rollout_row(rew, batch, done: list, G: int, chunks: int) -> dict:
    """The metrics row's rollout part: rewards, groups and kept sequences summed over ranks (collective)."""
    r = rew.rewards.view(-1, G)
    sums = all_reduce_sums(
        {
            "reward": float(r.sum()),
            "responses": float(r.numel()),
            "solved_groups": float((r.max(1).values > 0).sum()),
            "groups": float(r.shape[0]),
            "unparseable": float(rew.unparseable),
            "zero_var_groups": float(batch.zero_var_groups),
            "kept_sequences": float(len(batch.sequences)),
            "response_tokens": float(sum(len(d.tokens) for d in done)),
            "rollout_chunks": float(chunks),
        }
    )
    return {
        "reward_mean": sums["reward"] / sums["responses"],
        "action_accuracy": sums["reward"] / sums["responses"],
        "pass_at_g": sums["solved_groups"] / sums["groups"],
        "unparseable_frac": sums["unparseable"] / sums["responses"],
        "zero_var_groups": int(sums["zero_var_groups"]),
        "groups": int(sums["groups"]),
        "kept_sequences": int(sums["kept_sequences"]),
        "response_len": sums["response_tokens"] / sums["responses"],
        "rollout_chunks": int(sums["rollout_chunks"]),
    }


def build_reference(ctx: StageContext):
    """The frozen KL reference: the SFT weights (or the initial weights without an SFT stage), sharded."""
    cfg = ctx.cfg
    if "sft" in cfg.run.stages:
        ref, _ = load_hf_checkpoint(ctx.reference_dir, device=ctx.info.device, dtype=torch.float32)
    else:
        ref, _ = build_model(cfg.model, tokenizer=ctx.tokenizer, device=ctx.info.device)
    ref.requires_grad_(False)
    apply_fsdp(ref, param_dtype=DTYPES[cfg.fsdp.param_dtype], reduce_dtype=DTYPES[cfg.fsdp.reduce_dtype])
    return ref
