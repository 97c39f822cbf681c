"""TrainConfig (every section) and the checks that depend on the launch."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from singleturn.trainer.config.checks import _check
from singleturn.trainer.config.resume_keys import trajectory_settings
from singleturn.trainer.config.sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    FSDPConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)
from singleturn.trainer.config.stage_sections import (
    DaggerConfig,
    GRPOConfig,
    GRPOMultiTurnConfig,
    LMConfig,
    PPOConfig,
    RolloutConfig,
    SFTConfig,
)
from singleturn.trainer.stages import STAGES


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
    grpo_multiturn: GRPOMultiTurnConfig = field(default_factory=GRPOMultiTurnConfig)
    dagger: DaggerConfig = field(default_factory=DaggerConfig)
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
        if self.data.prompt == "episode":
            _check(
                self.eval.decoding == "rank" or self.eval.constrained or not self.eval.enabled,
                "data.prompt='episode' evaluates over each episode's KV cache, ranked or greedy under the "
                "admissible trie: set eval.decoding='rank' or eval.constrained=true",
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of the settings that determine the training trajectory, checked on resume: all but
        trainer/config/resume_keys.py's RESUME_FREE_KEYS (checkpoint cadence, eval.*, logging, run location).

        Only the settings that differ from their defaults are hashed, so a key added in a later
        version (at its default) does not orphan older checkpoints."""
        d = trajectory_settings(self.to_dict())
        defaults = trajectory_settings(TrainConfig().to_dict())
        d = {k: v for k, v in d.items() if v != defaults.get(k)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def validate_for_world(cfg: TrainConfig, world_size: int) -> None:
    """Checks that depend on the launch; call on every rank before any work."""
    for name in cfg.run.stages:
        what, n = STAGES[name].global_batch(cfg)  # split evenly over ranks every step
        _check(n % world_size == 0, f"{what}={n} is not divisible by the world size {world_size}")
