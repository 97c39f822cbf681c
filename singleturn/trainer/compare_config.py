"""The comparison driver's own settings (`[compare]` of a compare TOML) and the loader that merges the
rest of the file over the base train config (trainer/compare.py runs it, compare_report.py reports it)."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from singleturn.trainer.config import ConfigError, build_config, load_toml
from singleturn.trainer.stages import rl_stage_names

_REPO = Path(__file__).resolve().parents[2]


@dataclass(kw_only=True)
class CompareConfig:
    base: str = "configs/tiny-cpu.toml"
    """Train config the runs start from; the other sections of the compare file override it."""
    methods: list[str] = field(default_factory=lambda: ["sft", "ppo", "grpo-multiturn", "grpo"])
    """Rows of the table: 'sft' and the RL methods (which always start from the seed's SFT run)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds (model init, data order, sampling) of independent repeats."""
    sample_budget: int = 256
    """Sampled responses per RL method (the shared budget)."""
    out_dir: str = "runs/compare"
    """Where the runs, comparison.md/json and plots/ go."""
    launcher: str = ""
    """Command prefix for each run, e.g. 'torchrun --nproc_per_node=8' (empty: in this process)."""
    bound_sampled_episodes: int = 1
    """Sampled episodes per eval game for the sampling-policy bound check (0: greedy check only)."""

    def __post_init__(self):
        known = ("sft", *rl_stage_names())
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise ConfigError(f"compare.methods has unknown methods {bad}; choose from {list(known)}")
        if not self.seeds or self.sample_budget <= 0 or self.bound_sampled_episodes < 0:
            raise ConfigError("compare: need seeds, sample_budget > 0, bound_sampled_episodes >= 0")

    @property
    def gpus(self) -> int:
        m = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", self.launcher)
        return int(m.group(1)) if m else 1


def load_compare_config(path: str | Path) -> tuple[CompareConfig, dict]:
    """(CompareConfig, the merged train-config sections) from a compare TOML."""
    raw = load_toml(path)
    section = raw.pop("compare", {})
    types = typing.get_type_hints(CompareConfig)
    unknown = sorted(set(section) - set(types))
    if unknown:
        raise ConfigError(f"unknown compare keys {unknown}; keys: {sorted(types)}")
    cc = CompareConfig(**section)
    base_path = Path(cc.base) if Path(cc.base).is_absolute() else _REPO / cc.base
    train_raw = load_toml(base_path)
    for sec, values in raw.items():
        train_raw.setdefault(sec, {}).update(values)
    build_config(train_raw)  # validate the merged sections before any work
    return cc, train_raw
