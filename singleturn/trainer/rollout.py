"""What every stage that samples shares (single-turn GRPO, grpo-dagger, the multi-turn baselines): the
per-(run, step, rank) sampling seed, the dtype the weights are gathered in, and `sampling_policy`,
the act path (`model.EpisodePolicy`, decoding 'sample') that the multi-turn rollouts
(trainer/episodes.py) and grpo-dagger's play (harness.collect_states) drive."""

from __future__ import annotations

import torch

from singleturn.model.episode_policy import EpisodePolicy
from singleturn.model.policy import DTYPES


def rollout_seed(run_seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible sampling seed per (run, step, rank)."""
    return (run_seed * 1_000_003 + step * 7919 + rank * 104_729 + 1) & 0x7FFF_FFFF


def rollout_dtype(cfg) -> torch.dtype:
    return DTYPES[cfg.rollout.dtype]


def sampling_policy(model, tokenizer, rollout_cfg, *, fmt, max_prompt: int, rows: int, seed: int):
    """The rollout's sampling policy (`model.EpisodePolicy`, decoding 'sample') in prompt format `fmt`,
    `rows` live episodes at most: the window format writes each state's prompt afresh, left-truncated
    to max_prompt ids (counted in `truncated`); the episode format keeps each live episode's KV cache,
    each turn computing only what it adds, and an episode longer than the context is an error, not a
    truncation. Call c draws with seed + 7919 c, as `sample_completions` draws for the call's whole
    prompts; `last` holds the call's (prompt ids, Completion) pairs."""
    sampling = {k: getattr(rollout_cfg, k) for k in ("temperature", "top_p", "top_k", "max_new_tokens")}
    return EpisodePolicy(
        model,
        tokenizer,
        prompt=fmt.kind,
        decoding="sample",
        max_episodes=rows,
        max_len=max_prompt + rollout_cfg.max_new_tokens,
        history_window=fmt.history_window,
        list_admissible=fmt.list_admissible,
        system_prompt=fmt.system_prompt,
        sampling=sampling,
        seed=seed,
    )
