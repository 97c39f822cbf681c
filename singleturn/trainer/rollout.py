"""Rollout settings shared by every stage that samples (single-turn GRPO, grpo-dagger, the multi-turn
baselines): the per-(run, step, rank) sampling seed and the dtype the weights are gathered in."""

from __future__ import annotations

import torch


def rollout_seed(run_seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible sampling seed per (run, step, rank)."""
    return (run_seed * 1_000_003 + step * 7919 + rank * 104_729 + 1) & 0x7FFF_FFFF


def rollout_dtype(cfg) -> torch.dtype:
    from singleturn.model.policy import DTYPES

    return DTYPES[cfg.rollout.dtype]
