"""The single-turn reward of the paper: r(s, a) = 1{a == pi_GT(s)}, and GRPO group bookkeeping.

A response earns 1 when `harness.parse_action(response, admissible)` returns exactly the expert's
action for that state, else 0; a response the parser rejects (no admissible action in it) is 0 and
counted as unparseable. Groups whose rewards are all equal carry no learning signal (their GRPO
advantages are exactly zero): they are found here so the loop can drop and count them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from singleturn.harness import parse_action


@dataclass
class RewardResult:
    rewards: torch.Tensor  # (B*G,) fp32 in {0, 1}
    unparseable: int
    """Responses with no admissible action in them."""
    actions: list[str | None]
    """The parsed action of each response (None when unparseable)."""


def expert_match_rewards(responses: list[str], states: list[dict], group_size: int) -> RewardResult:
    """Rewards for prompt-major responses: response i answers states[i // group_size]."""
    if len(responses) != len(states) * group_size:
        raise ValueError(f"{len(responses)} responses for {len(states)} states x group {group_size}")
    rewards, actions, unparseable = [], [], 0
    for i, text in enumerate(responses):
        state = states[i // group_size]
        action = parse_action(text, state["admissible"])
        if action is None:
            unparseable += 1
        actions.append(action)
        rewards.append(1.0 if action is not None and action == state["expert_action"] else 0.0)
    return RewardResult(torch.tensor(rewards, dtype=torch.float32), unparseable, actions)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [B]: groups whose G rewards are all equal (all right or all wrong).

    Exact comparison (not std < eps): rewards are 0/1, and group_advantages gives such groups
    exactly zero advantage, so they add nothing but cost to the policy gradient.
    """
    r = rewards.view(-1, group_size)  # (B, G)
    return r.max(dim=1).values == r.min(dim=1).values
