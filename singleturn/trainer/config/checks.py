"""ConfigError and the checks every section shares."""

from __future__ import annotations

import dataclasses
import math

from singleturn.trainer.errors import ConfigError

__all__ = ["ConfigError"]


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
