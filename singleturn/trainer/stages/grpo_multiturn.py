"""The `grpo-multiturn` stage: trajectory-level GRPO with a sparse episode reward (GiGPO's baseline).

G = grpo_multiturn.group_size episodes of the same game per group; the episode reward (trainer/gae.py
`episode_returns`) is normalized within its group (kernels.group_advantages) and applied to all of
the episode's action tokens; zero-variance groups are dropped (counted). An env-failed episode
counts as reward 0 in its group and is not trained on. Rollouts and the policy update are shared
with ppo (trainer/stages/multiturn.py).
"""

from __future__ import annotations

import torch

from singleturn.kernels.group_advantages import group_advantages
from singleturn.trainer.episodes import EpisodeRollout
from singleturn.trainer.gae import episode_returns
from singleturn.trainer.policy_loss import Sequence
from singleturn.trainer.reward import zero_variance_groups
from singleturn.trainer.stages.base import register
from singleturn.trainer.stages.multiturn import EpisodeStage


def group_episode_advantages(
    episodes: list[EpisodeRollout], group_size: int, *, success_discount: float, adv_scale: str
) -> tuple[torch.Tensor, int]:
    """(per-episode advantage [B*G] fp32, zero-variance groups). Episodes come group-contiguous."""
    won = torch.tensor([ep.won for ep in episodes], dtype=torch.bool)
    steps = torch.tensor([ep.steps for ep in episodes], dtype=torch.int64)
    rewards = episode_returns(won, steps, success_discount=success_discount)  # (B*G,)
    adv = group_advantages(rewards, group_size, scale=adv_scale)
    return adv, int(zero_variance_groups(rewards, group_size).sum())


@register
class GRPOMultiTurnStage(EpisodeStage):
    name = "grpo-multiturn"
    label = "SFT+GRPO-MT"
    method = "GRPO (multi-turn)"

    section = "grpo_multiturn"

    @classmethod
    def group_size(cls, cfg) -> int:
        return cfg.grpo_multiturn.group_size

    def sequences(self, episodes: list[EpisodeRollout]) -> tuple[list[Sequence], dict]:
        G, c = self.cfg.group_size, self.cfg
        adv, zero_var = group_episode_advantages(
            episodes, G, success_discount=c.success_discount, adv_scale=c.adv_scale
        )
        zero = (adv.view(-1, G) == 0).all(dim=1)  # (groups,) no signal: not trained on
        kept = [
            Sequence(t.prompt, t.response, t.logprobs, float(adv[i]))
            for i, ep in enumerate(episodes)
            if not ep.failed and not bool(zero[i // G])
            for t in ep.turns
            if t.response
        ]
        return kept, {"zero_var_groups": zero_var}
