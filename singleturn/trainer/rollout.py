"""What every stage that samples shares (single-turn GRPO, grpo-dagger, the multi-turn baselines): the
per-(run, step, rank) sampling seed, the dtype the weights are gathered in, and `SamplingPolicy`, the
one messages -> ids -> sample loop the multi-turn rollouts (trainer/episodes.py) and grpo-dagger's
play (harness.collect_states) drive."""

from __future__ import annotations

import torch

from singleturn.model.episode_policy import EpisodePolicy
from singleturn.model.policy import DTYPES, encode_prompt, sample_completions


def rollout_seed(run_seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible sampling seed per (run, step, rank)."""
    return (run_seed * 1_000_003 + step * 7919 + rank * 104_729 + 1) & 0x7FFF_FFFF


def rollout_dtype(cfg) -> torch.dtype:
    return DTYPES[cfg.rollout.dtype]


class SamplingPolicy:
    """The rollout's sampling policy as a harness text policy (list[messages] -> list[str]): one
    response per state; call c is seeded seed + 7919 c; prompts are left-truncated to `max_prompt`
    ids (`model.policy.encode_prompt`, counted in `truncated`). After each call `last` holds the
    call's (prompt ids, `Completion`) pairs, in order, for callers that record the turns."""

    def __init__(self, model, tokenizer, rollout_cfg, *, max_prompt: int, seed: int):
        self.model, self.tokenizer, self.cfg = model, tokenizer, rollout_cfg
        self.max_prompt, self.seed = max_prompt, seed
        self.calls = self.decisions = self.response_tokens = self.truncated = 0
        self.last: list = []

    def __call__(self, batch: list[list[dict]]) -> list[str]:
        prompts = []
        for messages in batch:
            ids, cut = encode_prompt(self.tokenizer, messages, self.max_prompt)
            self.truncated += cut
            prompts.append(ids)
        r = self.cfg
        done = sample_completions(
            self.model,
            self.tokenizer,
            prompts,
            num_samples=1,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            seed=(self.seed + 7919 * self.calls) & 0x7FFF_FFFF,
        )
        self.calls += 1
        self.decisions += len(done)
        self.response_tokens += sum(len(d.tokens) for d in done)
        self.last = list(zip(prompts, done))
        return [d.text for d in done]


def sampling_policy(model, tokenizer, rollout_cfg, *, fmt, max_prompt: int, rows: int, seed: int):
    """The rollout's sampling policy for prompt format `fmt`: the window format re-encodes each
    state's prompt (`SamplingPolicy`, left-truncated to max_prompt); the episode format keeps each live
    episode's KV cache (`model.EpisodePolicy`, decoding 'sample', `rows` live episodes at most): the
    same prompts and draws, each turn computing only what it adds; an episode longer than the context
    is an error there, not a truncation. Both count decisions, response_tokens and truncated and
    leave the call's (prompt ids, Completion) pairs in `last`."""
    if fmt.kind != "episode":
        return SamplingPolicy(model, tokenizer, rollout_cfg, max_prompt=max_prompt, seed=seed)
    sampling = {k: getattr(rollout_cfg, k) for k in ("temperature", "top_p", "top_k", "max_new_tokens")}
    return EpisodePolicy(
        model,
        tokenizer,
        decoding="sample",
        max_episodes=rows,
        max_len=max_prompt + rollout_cfg.max_new_tokens,
        list_admissible=fmt.list_admissible,
        system_prompt=fmt.system_prompt,
        sampling=sampling,
        seed=seed,
    )
