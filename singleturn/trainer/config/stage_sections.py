"""The sections of the training stages: lm, sft, rollout, grpo, ppo and grpo_multiturn (the multi-turn
baselines), dagger (grpo-dagger's policy-state pool)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from singleturn.trainer.config.checks import _check, _check_finite, _check_stage


@dataclass(kw_only=True)
class SFTConfig:
    steps: int = 100
    """Optimizer steps of supervised fine-tuning on the expert actions."""
    batch_size: int = 32
    """Global states per step (divided evenly across ranks)."""
    micro_batch_size: int = 16
    """States per forward/backward on one rank (packing = false; gradients accumulate)."""
    packing: bool = True
    """Pack several examples per row (block-diagonal causal mask, positions restart per example, no
    padding between them; rows of at most data.max_seq_len tokens) instead of one right-padded row per
    example; micro-batches then hold at most max_tokens_per_micro_batch computed tokens."""
    max_tokens_per_micro_batch: int = 8192
    """Token budget (rows x row width) of one forward/backward when packing."""
    lr: float = 0.0
    """Stage learning rate; 0 uses optim.lr."""

    _section = "sft"

    def __post_init__(self):
        _check_stage(self, self._section)
        _check(self.max_tokens_per_micro_batch > 0, f"{self._section}.max_tokens_per_micro_batch must be > 0")


@dataclass(kw_only=True)
class LMConfig(SFTConfig):
    """The language-model warm-up stage ("lm"): next-token cross-entropy over the whole rendered
    prompt + expert action of the train states. It stands in for the pretraining a real LLaMA has;
    meant for from-scratch models (it teaches the domain text and copying). Same knobs as [sft]."""

    steps: int = 0
    """Optimizer steps of the warm-up (0: none)."""
    batch_size: int = 16
    """Global states per step (divided evenly across ranks)."""

    _section = "lm"


@dataclass(kw_only=True)
class RolloutConfig:
    group_size: int = 8
    """G: responses sampled per state (the GRPO group)."""
    temperature: float = 1.0
    """Sampling temperature (also the temperature of the training log-probs)."""
    top_p: float = 1.0
    """Nucleus truncation; < 1 makes the behaviour log-probs those of the truncated policy."""
    top_k: int = 0
    """Top-k truncation (0: off)."""
    max_new_tokens: int = 24
    """Longest response."""
    dtype: str = "float32"
    """Dtype of the full weights gathered for the rollout phase and evaluation ('float32', 'bfloat16', or
    'auto': the fastest on this machine, resolved at parse time, see trainer/config/auto_dtype.py)."""
    max_cache_mb: int = 8192
    """Bound on the KV cache one single-turn rollout allocates, in MiB (0: none). A rollout whose
    states x G rows at its longest prompt would need more is decoded in consecutive chunks of whole
    states (`model.generate`), chunk c on its own sampling stream (chunk 0 draws what the unchunked
    call would), so batch_size x oversample x G cannot run the machine out of memory. 8 GiB: the CPU
    configs' rollouts fit unchunked (the LLaMA GPU configs set their own). On CPU a smaller bound is also faster (2 GiB: 0.65x the
    time of one unbounded 256-row SmolLM2 batch, bench/results/smollm2-135m-cpu/rollout_memory.md)."""

    def __post_init__(self):
        _check(
            self.group_size >= 2,
            f"rollout.group_size must be >= 2 (got {self.group_size}): GRPO needs a group",
        )
        _check_finite(self, "rollout")
        _check(self.temperature > 0, f"rollout.temperature must be > 0 for sampling, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "rollout.top_k must be >= 0")
        _check(self.max_new_tokens > 0, "rollout.max_new_tokens must be > 0")
        _check(
            self.max_cache_mb >= 0,
            f"rollout.max_cache_mb must be >= 0 (0: no bound), got {self.max_cache_mb}",
        )
        _check(
            self.dtype in ("float32", "bfloat16", "auto"),
            f"rollout.dtype={self.dtype!r}: 'float32', 'bfloat16' or 'auto'",
        )


@dataclass(kw_only=True)
class GRPOConfig:
    steps: int = 50
    """Rollout batches (each followed by ppo_epochs optimizer steps)."""
    batch_size: int = 16
    """Global states per rollout batch (divided evenly across ranks); B*G sequences."""
    micro_batch_size: int = 32
    """Sequences per forward/backward on one rank."""
    ppo_epochs: int = 1
    """Optimizer steps per rollout batch, all against the sampled (behaviour) log-probs."""
    clip_eps_low: float = 0.2
    """Lower PPO clip: ratio >= 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """Upper PPO clip: ratio <= 1 + clip_eps_high."""
    kl_coef: float = 0.0
    """k3 KL penalty to the frozen SFT reference (0: no reference model is built)."""
    adv_scale: str = "std"
    """Advantage normalization: 'std' (GRPO) or 'none' (Dr.GRPO)."""
    lr: float = 0.0
    """Stage learning rate; 0 uses optim.lr."""
    oversample: int = 1
    """Dynamic sampling: roll out oversample x batch_size states per step and train on the first
    batch_size groups with reward variance (1: no oversampling, zero-variance groups just dropped)."""
    train_zero_variance: bool = False
    """Also train the groups whose G rewards are all equal (advantage 0: no policy gradient, but the
    forward/backward work TRL's GRPOTrainer does; bench/bench_vs_trl.py's equal-work sides)."""
    shared_prefix: bool = True
    """Train each prompt once: a row holds [prompt | r_1 | ... | r_G] under a tree mask (positions
    restart after the prompt; a response sees the prompt and itself), several per row up to
    data.max_seq_len tokens, micro-batches up to max_tokens_per_micro_batch computed tokens. False:
    one right-padded row per sequence, micro_batch_size per micro-batch (the reference path)."""
    max_tokens_per_micro_batch: int = 8192
    """Token budget (rows x row width) of one forward/backward with shared_prefix."""

    def __post_init__(self):
        _check_stage(self, "grpo")
        _check(self.max_tokens_per_micro_batch > 0, "grpo.max_tokens_per_micro_batch must be > 0")
        _check(self.oversample >= 1, "grpo.oversample must be >= 1")
        _check(self.ppo_epochs >= 1, "grpo.ppo_epochs must be >= 1")
        _check(0 <= self.clip_eps_low < 1, f"grpo.clip_eps_low must be in [0, 1), got {self.clip_eps_low}")
        _check(self.clip_eps_high >= 0, f"grpo.clip_eps_high must be >= 0, got {self.clip_eps_high}")
        _check(self.kl_coef >= 0, f"grpo.kl_coef must be >= 0, got {self.kl_coef}")
        _check(self.adv_scale in ("std", "none"), f"grpo.adv_scale={self.adv_scale!r}: 'std' or 'none'")


@dataclass(kw_only=True)
class MultiTurnConfig:
    """What the multi-turn baselines share (trainer/stages/multiturn.py): rollout batches of whole
    episodes and the clipped policy update. Each baseline has its own section: [ppo] and [grpo_multiturn]."""

    section: ClassVar[str] = ""
    steps: int = 20
    """Rollout batches of episodes (each followed by ppo_epochs policy steps)."""
    episodes_per_step: int = 16
    """Global episodes per rollout batch (divided evenly across ranks)."""
    micro_batch_size: int = 32
    """Turn sequences per forward/backward on one rank."""
    ppo_epochs: int = 1
    """Policy optimizer steps per rollout batch, all against the sampled (behaviour) log-probs."""
    clip_eps_low: float = 0.2
    """Lower PPO clip: ratio >= 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """Upper PPO clip: ratio <= 1 + clip_eps_high."""
    max_steps: int = 30
    """Episode step limit of the training rollouts."""
    num_workers: int = 2
    """Env worker processes per rank for the training rollouts."""
    success_discount: float = 1.0
    """Episode reward = won * success_discount**(turns - 1) (1: plain sparse success)."""
    lr: float = 0.0
    """Stage learning rate; 0 uses optim.lr."""
    shared_prefix: bool = True
    """Pack the turn sequences into rows by tokens (each turn has its own prompt; see grpo.shared_prefix)."""
    max_tokens_per_micro_batch: int = 8192
    """Token budget (rows x row width) of one forward/backward with shared_prefix."""

    def __post_init__(self):
        s = self.section
        _check_finite(self, s)
        _check(self.max_tokens_per_micro_batch > 0, f"{s}.max_tokens_per_micro_batch must be > 0")
        _check(self.steps >= 0, f"{s}.steps must be >= 0")
        _check(
            self.episodes_per_step > 0 and self.micro_batch_size > 0,
            f"{s}.episodes_per_step/micro_batch_size must be > 0",
        )
        _check(self.ppo_epochs >= 1, f"{s}.ppo_epochs must be >= 1")
        _check(0 <= self.clip_eps_low < 1, f"{s}.clip_eps_low must be in [0, 1), got {self.clip_eps_low}")
        _check(self.clip_eps_high >= 0, f"{s}.clip_eps_high must be >= 0, got {self.clip_eps_high}")
        _check(self.max_steps > 0 and self.num_workers > 0, f"{s}.max_steps/num_workers must be > 0")
        _check(
            0 < self.success_discount <= 1,
            f"{s}.success_discount must be in (0, 1], got {self.success_discount}",
        )
        _check(self.lr >= 0, f"{s}.lr must be >= 0, got {self.lr}")


@dataclass(kw_only=True)
class PPOConfig(MultiTurnConfig):
    """Stage 'ppo' (trainer/stages/ppo.py): turn-level GAE and a critic."""

    section: ClassVar[str] = "ppo"
    gamma: float = 1.0
    """Turn-level discount of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    adv_whiten: bool = True
    """Whiten the GAE advantages over the global batch."""
    value_lr: float = 1e-3
    """AdamW learning rate of the value head."""
    value_epochs: int = 4
    """Value-head optimizer steps per rollout batch."""
    value_clip: float = 0.2
    """Value clipping around the rollout-time values (0: off)."""
    value_hidden_dim: int = 0
    """0 = linear value head; > 0 = a small MLP critic of that width (on the policy's features)."""

    def __post_init__(self):
        super().__post_init__()
        for k in ("gamma", "lam"):
            _check(0 <= getattr(self, k) <= 1, f"ppo.{k} must be in [0, 1], got {getattr(self, k)}")
        _check(self.value_epochs >= 1, "ppo.value_epochs must be >= 1")
        _check(self.value_lr > 0, f"ppo.value_lr must be > 0, got {self.value_lr}")
        _check(self.value_clip >= 0, f"ppo.value_clip must be >= 0, got {self.value_clip}")
        _check(self.value_hidden_dim >= 0, f"ppo.value_hidden_dim must be >= 0, got {self.value_hidden_dim}")


@dataclass(kw_only=True)
class GRPOMultiTurnConfig(MultiTurnConfig):
    """Stage 'grpo-multiturn' (trainer/stages/grpo_multiturn.py): the episode reward normalized within
    a group of episodes of the same game."""

    section: ClassVar[str] = "grpo_multiturn"
    group_size: int = 4
    """Episodes per game (the group); episodes_per_step must be a multiple."""
    adv_scale: str = "std"
    """Group normalization, 'std' (GRPO) or 'none' (Dr.GRPO)."""

    def __post_init__(self):
        super().__post_init__()
        s = self.section
        _check(self.group_size >= 2, f"{s}.group_size must be >= 2")
        _check(
            self.episodes_per_step % self.group_size == 0,
            f"{s}.episodes_per_step={self.episodes_per_step} is not a multiple of {s}.group_size={self.group_size}",
        )
        _check(self.adv_scale in ("std", "none"), f"{s}.adv_scale={self.adv_scale!r}: 'std' or 'none'")


@dataclass(kw_only=True)
class DaggerConfig:
    """The `grpo-dagger` stage (trainer/stages/grpo_dagger.py): single-turn GRPO whose state pool also
    holds the policy's own states, labelled by the expert. Its steps, batch, lr and update are [grpo]'s;
    this section sets how the policy states are collected and mixed in."""

    every: int = 4
    """K: the current sampling policy plays `episodes` train games before stage steps K-1, 2K-1, ...
    (so n steps play n // K refreshes and never overspend the per-step sample bound)."""
    episodes: int = 8
    """Train games played per refresh (one episode each, split over ranks)."""
    max_steps: int = 30
    """Episode step limit of the refresh play."""
    num_workers: int = 2
    """Env worker processes per rank for the refresh play."""
    mix_ratio: float = 0.5
    """Fraction of each step's rollout states drawn from the policy pool (at most the pool's size;
    the rest are grpo's expert states). 0: grpo's batches exactly (the play still runs and counts)."""
    pool_size: int = 1024
    """Most policy states kept; a refresh that overfills the pool evicts the oldest states first (FIFO:
    the pool holds the most recent policies' states)."""

    def __post_init__(self):
        _check_finite(self, "dagger")
        _check(self.every >= 1, f"dagger.every must be >= 1 (refresh every K steps), got {self.every}")
        _check(0 <= self.mix_ratio <= 1, f"dagger.mix_ratio must be in [0, 1], got {self.mix_ratio}")
        _check(self.pool_size >= 1, f"dagger.pool_size must be >= 1, got {self.pool_size}")
        _check(self.episodes >= 1, f"dagger.episodes must be >= 1, got {self.episodes}")
        _check(self.max_steps >= 1, f"dagger.max_steps must be >= 1, got {self.max_steps}")
        _check(self.num_workers >= 1, f"dagger.num_workers must be >= 1, got {self.num_workers}")
