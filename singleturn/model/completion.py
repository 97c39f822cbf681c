"""What every policy decodes into (`Completion`) and the ids that end a response (`stop_ids`): shared
by the per-prompt policy (model/policy.py) and the episode-cache policy (model/episode_policy.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def stop_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end a response: the end-of-turn id and the tokenizer's other end-of-sequence ids."""
    ids = {tokenizer.eot_id}
    ids.update(getattr(tokenizer, "eos_ids", ()) or ())
    return tuple(sorted(ids))


@dataclass
class Completion:
    """One generated response: ids up to and including the stop token, their log-probs, the text."""

    tokens: list[int]
    logprobs: torch.Tensor  # (len(tokens),) fp32 cpu: sampled-token log-probs (0 for greedy)
    text: str
