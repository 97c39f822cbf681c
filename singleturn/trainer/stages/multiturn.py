"""What the multi-turn baselines share (`ppo`, `grpo-multiturn`): episodes in, one policy update out.

One step = one rollout batch of episodes played in the harness env workers with the current
sampling policy (trainer/episodes.py); every turn becomes one sequence (its prompt, its sampled
response, the sampling log-probs) with a per-turn advantage broadcast to the turn's action tokens,
and the update is the SAME `trainer.update.policy_update` as single-turn GRPO. Subclasses supply
the advantages (`sequences`) and anything after the policy update (`after_update`).

Sample budget: one turn = one sampled response; rows report `samples` (global) so the comparison
can match methods on samples. Env failures are dropped from training (counted). Episodes cut by
the step limit are treated as terminal (reward 0, no bootstrap).
"""

from __future__ import annotations

import time

import torch

from singleturn.trainer.data import prompt_format
from singleturn.trainer.dist import all_reduce_sums
from singleturn.trainer.episodes import (
    CollectStats,
    EpisodeRollout,
    collect_episodes,
    step_games,
    train_games,
)
from singleturn.trainer.policy_loss import PolicyBatch, Sequence
from singleturn.trainer.rollout import rollout_seed
from singleturn.trainer.stages.base import Stage, StageContext, StageSpan
from singleturn.trainer.update import UpdateSettings, policy_update


def _rollout_sums(episodes: list[EpisodeRollout], cs: CollectStats, kept: int, zero_var: int) -> dict:
    """The rollout batch's counts, summed over ranks (collective)."""
    turns = [t for ep in episodes for t in ep.turns]
    labeled = [t for t in turns if t.expert_match is not None]
    return all_reduce_sums(
        {
            "won": float(sum(ep.won for ep in episodes)),
            "episodes": float(len(episodes)),
            "samples": float(cs.samples),
            "invalid": float(sum(t.action is None for t in turns)),
            "expert_matches": float(sum(bool(t.expert_match) for t in labeled)),
            "labeled": float(len(labeled)),
            "env_failures": float(sum(ep.failed for ep in episodes)),
            "kept_sequences": float(kept),
            "response_tokens": float(cs.response_tokens),
            "prompt_tokens": float(cs.prompt_tokens),
            "zero_var_groups": float(zero_var),
            "truncated_prompts": float(cs.truncated_prompts),
        }
    )


def _rollout_row(sums: dict) -> dict:
    """The metrics row's rollout part from the summed counts."""
    n_samples = max(sums["samples"], 1.0)
    n_episodes = max(sums["episodes"], 1.0)
    return {
        "reward_mean": sums["won"] / n_episodes,
        "success_rate": sums["won"] / n_episodes,
        "episodes": int(sums["episodes"]),
        "samples": int(sums["samples"]),
        "env_steps": int(sums["samples"]),
        "episode_len": sums["samples"] / n_episodes,
        "invalid_rate": sums["invalid"] / n_samples,
        "action_accuracy": sums["expert_matches"] / max(sums["labeled"], 1.0),
        "env_failures": int(sums["env_failures"]),
        "kept_sequences": int(sums["kept_sequences"]),
        "response_len": sums["response_tokens"] / n_samples,
        "zero_var_groups": int(sums["zero_var_groups"]),
        "truncated_prompts": int(sums["truncated_prompts"]),
    }


def _dummy(episodes: list[EpisodeRollout], eot_id: int) -> Sequence:
    """A zero-weight sequence for FSDP micro-batch padding (any real turn, else a 1-token stub)."""
    for ep in episodes:
        for t in ep.turns:
            if t.response:
                return Sequence(t.prompt, t.response, t.logprobs, 0.0)
    return Sequence([eot_id], [eot_id], torch.zeros(1), 0.0)


class EpisodeStage(Stage):
    """Base of the multi-turn stages (not registered itself)."""

    kind = "rl"
    log_keys = ("loss", "reward_mean", "pass_at_g", "zero_var_groups", "clip_frac", "kl", "response_len")
    plot_keys = {"loss": "loss", "reward": "reward_mean", "accuracy": "action_accuracy"}
    with_features = False
    """Whether turns need the critic's state features."""

    def __init__(self, ctx: StageContext, span: StageSpan):
        super().__init__(ctx, span)
        self.cfg = getattr(ctx.cfg, self.section)
        self.games = train_games(ctx.cfg.data)

    @classmethod
    def global_batch(cls, cfg) -> tuple[str, int]:
        c = getattr(cfg, cls.section)
        return f"{cls.section}: games per rollout batch", c.episodes_per_step // cls.group_size(cfg)

    @classmethod
    def group_size(cls, cfg) -> int:
        return 1

    @classmethod
    def samples_per_step(cls, cfg) -> int:
        c = getattr(cfg, cls.section)
        return c.episodes_per_step * c.max_steps

    @classmethod
    def samples(cls, cfg, rows: list[dict]) -> int:
        return sum(int(r.get("samples", 0)) for r in rows)

    def sequences(self, episodes: list[EpisodeRollout]) -> tuple[list[Sequence], dict]:
        """(training sequences, extra: {"zero_var_groups": int, "row": {...}, ...})."""
        raise NotImplementedError

    def after_update(self, extra: dict) -> dict:
        """Metrics of work done after the policy update (the PPO critic's)."""
        return {}

    def step(self, ctx: StageContext, i: int) -> dict:
        c, info = self.cfg, ctx.info
        t0 = time.perf_counter()
        episodes, cs = self._collect(ctx, i)
        t_roll = time.perf_counter() - t0
        t1 = time.perf_counter()
        kept, extra = self.sequences(episodes)
        batch = PolicyBatch(kept, _dummy(episodes, ctx.tokenizer.eot_id), extra.get("zero_var_groups", 0))
        sums = _rollout_sums(episodes, cs, len(kept), batch.zero_var_groups)
        row = {**_rollout_row(sums), "time_rollout": t_roll, **extra.get("row", {})}
        if row["kept_sequences"] == 0:
            # Nothing to learn from (every group had zero reward variance, or no turn survived).
            row.update(skipped=True, skip_reason="no_sequences", loss=0.0, clip_frac=0.0, kl=0.0)
            ctx.skipped_steps += 1
        else:
            settings = UpdateSettings(
                layout=ctx.layout(c),
                epochs=c.ppo_epochs,
                clip_eps_low=c.clip_eps_low,
                clip_eps_high=c.clip_eps_high,
                kl_coef=0.0,
                temperature=ctx.cfg.rollout.temperature,
            )
            row.update(policy_update(ctx, batch, settings, lr=self.lr(ctx, i)))
        row.update(self.after_update(extra))
        dt = time.perf_counter() - t1
        tokens = sums["response_tokens"] + sums["prompt_tokens"]
        row.update(time_train=dt, tokens_per_s=tokens * c.ppo_epochs / max(dt, 1e-9) / info.world_size)
        return row

    def _collect(self, ctx: StageContext, i: int) -> tuple[list[EpisodeRollout], CollectStats]:
        """This rank's rollout batch of step i: its games played with the sampling policy."""
        c, info = self.cfg, ctx.info
        games = step_games(
            self.games,
            i,
            episodes=c.episodes_per_step,
            group_size=self.group_size(ctx.cfg),
            seed=ctx.cfg.data.seed,
            rank=info.rank,
            world=info.world_size,
        )
        return collect_episodes(
            ctx.model,
            ctx.fsdp,
            ctx.tokenizer,
            games,
            rollout_cfg=ctx.cfg.rollout,
            fmt=prompt_format(ctx.cfg.data),
            max_steps=c.max_steps,
            max_seq_len=ctx.model.config.max_seq_len,
            seed=rollout_seed(ctx.cfg.run.seed, self.span.first + i, info.rank),
            device=info.device,
            num_workers=c.num_workers,
            with_features=self.with_features,
        )
