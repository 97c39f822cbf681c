"""Run configuration: one small kw-only dataclass per concern, loaded from TOML plus CLI overrides.

torchtitan style: every field has a docstring under it, each dataclass validates itself in
`__post_init__`, and `validate_for_world(cfg, world_size)` checks what depends on the launch (batch
divisibility) before any work starts. Builders take the sub-config they need, never `TrainConfig`.

CLI: `trainer/main.py --config configs/X.toml [--section.key=value | --section.key value ...]
[--resume | --overwrite]`. Override values are parsed by the field's type (bool: true/false/1/0;
lists: comma separated); unknown sections/keys, values of the wrong type, non-finite floats and
out-of-range values are errors that name the key; a TOML syntax error names the file, line and column.

Layout: checks.py (ConfigError, shared checks), sections.py (model, data, optim, fsdp, eval,
checkpoint, run), stage_sections.py (lm, sft, rollout, grpo, ppo, dagger), train_config.py (TrainConfig,
validate_for_world), cli.py (TOML + CLI parsing, dump_toml / load_toml).
"""

from singleturn.trainer.config.checks import ConfigError
from singleturn.trainer.config.cli import (
    algo_stages,
    algos,
    build_config,
    dump_toml,
    format_config,
    load_toml,
    parse_args,
)
from singleturn.trainer.config.sections import (
    DECODINGS,
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
from singleturn.trainer.config.train_config import TrainConfig, validate_for_world

__all__ = [
    "DECODINGS",
    "CheckpointConfig",
    "ConfigError",
    "DaggerConfig",
    "DataConfig",
    "EvalConfig",
    "FSDPConfig",
    "GRPOConfig",
    "GRPOMultiTurnConfig",
    "LMConfig",
    "ModelConfig",
    "OptimConfig",
    "PPOConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "TrainConfig",
    "algo_stages",
    "algos",
    "build_config",
    "dump_toml",
    "format_config",
    "load_toml",
    "parse_args",
    "validate_for_world",
]
