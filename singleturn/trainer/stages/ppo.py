"""The `ppo` stage: multi-turn PPO with a sparse episode reward, turn-level GAE and a critic.

Reward = won * success_discount**(L-1) at the last turn (trainer/gae.py); a value head on the
policy's final hidden state at each turn's state (trainer/value.py) gives V; turn-level GAE gives
A_t and the returns; A is whitened over the global batch; the value head is regressed on the
returns (clipped value loss) with its own AdamW. The value head is replicated (identical on every
rank); it and its AdamW state travel in the checkpoint (`state_dict()` / `load_state_dict()`), so a
resumed `ppo` stage continues with the same critic. Rollouts and the policy update are shared with
grpo-multiturn (trainer/stages/multiturn.py).
"""

from __future__ import annotations

import torch

from singleturn.trainer.dist import all_reduce_sum, all_reduce_sums
from singleturn.trainer.episodes import EpisodeRollout
from singleturn.trainer.gae import compute_gae, episode_rewards, masked_whiten, turn_mask, value_loss
from singleturn.trainer.policy_loss import Sequence
from singleturn.trainer.stages.base import StageContext, StageSpan, register
from singleturn.trainer.stages.multiturn import EpisodeStage
from singleturn.trainer.value import ValueHead, sync_grads


def ppo_advantages(episodes: list[EpisodeRollout], values: list[torch.Tensor], ppo_cfg, *, all_reduce=None):
    """Per-turn (advantages, returns) lists (one fp32 [L] tensor per episode) by turn-level GAE.

    values: V of each episode's turns ([L] fp32). Advantages are whitened over the global batch when
    ppo_cfg.adv_whiten (all_reduce sums the statistics over ranks).
    """
    # No early return on an empty list: the whitening below is a collective every rank must join.
    lengths = torch.tensor([ep.steps for ep in episodes], dtype=torch.int64)  # (B,)
    T = max([ep.steps for ep in episodes] + [1])
    m = turn_mask(lengths, T)  # (B, T)
    v = torch.zeros(len(episodes), T)
    for b, vals in enumerate(values):
        v[b, : len(vals)] = vals
    won = torch.tensor([ep.won for ep in episodes], dtype=torch.bool)
    r = episode_rewards(won, lengths, T, success_discount=ppo_cfg.success_discount)  # (B, T)
    adv, ret = compute_gae(r, v, m, gamma=ppo_cfg.gamma, lam=ppo_cfg.lam)  # (B, T) each
    if ppo_cfg.adv_whiten:
        adv = masked_whiten(adv, m, all_reduce=all_reduce)
    return [adv[b, :L] for b, L in enumerate(lengths.tolist())], [
        ret[b, :L] for b, L in enumerate(lengths.tolist())
    ]


@register
class PPOStage(EpisodeStage):
    name = "ppo"
    section = "ppo"
    label = "SFT+PPO"
    method = "PPO (multi-turn)"
    with_features = True

    def __init__(self, ctx: StageContext, span: StageSpan):
        super().__init__(ctx, span)

        c = self.cfg
        with torch.random.fork_rng(devices=[]):  # same head on every rank; the run's RNG untouched
            torch.manual_seed(ctx.cfg.run.seed)
            self.value_head = ValueHead(ctx.model.config.dim, hidden_dim=c.value_hidden_dim)
        self.value_opt = torch.optim.AdamW(self.value_head.parameters(), lr=c.value_lr, weight_decay=0.0)
        self.grad_clip = ctx.cfg.optim.grad_clip

    def state_dict(self) -> dict:
        """The critic (value head + its AdamW) for the checkpoint."""
        return {"value_head": self.value_head.state_dict(), "value_opt": self.value_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; a checkpoint without a critic must not resume `ppo`."""
        if "value_head" not in state or "value_opt" not in state:
            raise ValueError(
                "resuming a ppo stage: the checkpoint holds no value head (written mid-ppo by an older version?)"
            )
        self.value_head.load_state_dict(state["value_head"])
        self.value_opt.load_state_dict(state["value_opt"])

    def sequences(self, episodes: list[EpisodeRollout]) -> tuple[list[Sequence], dict]:
        live = [ep for ep in episodes if not ep.failed and ep.turns]
        with torch.no_grad():
            values = [self.value_head(ep.features) for ep in live]  # [L] fp32 each
        advs, rets = ppo_advantages(live, values, self.cfg, all_reduce=all_reduce_sum)
        kept = [
            Sequence(t.prompt, t.response, t.logprobs, float(a))
            for ep, adv in zip(live, advs)
            for t, a in zip(ep.turns, adv.tolist())
            if t.response and a != 0.0  # a zero advantage adds no gradient, only cost
        ]
        dim = self.value_head.dim
        v_all = _cat(values)
        return kept, {
            "features": _cat([ep.features for ep in live], dim),
            "returns": _cat(rets).reshape(-1),
            "old_values": v_all.reshape(-1),
            "row": {"value_mean": float(v_all.mean()) if v_all.numel() else 0.0},
        }

    def after_update(self, extra: dict) -> dict:
        return self.update_value(extra["features"], extra["returns"], extra["old_values"])

    def update_value(self, feats: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor) -> dict:
        """value_epochs full-batch AdamW steps of the clipped value loss (global mean over turns)."""
        c = self.cfg
        n = max(all_reduce_sum(float(returns.numel())), 1.0)  # host sync: the global normalizer
        clip = self.grad_clip or float("inf")
        loss_sum = clipped = 0.0
        for _ in range(c.value_epochs):
            out = value_loss(self.value_head(feats), returns, old_values=old_values, clip_eps=c.value_clip)
            self.value_opt.zero_grad(set_to_none=False)
            (out.loss / n).backward()
            sync_grads(self.value_head)  # replicated head: identical summed gradients on every rank
            torch.nn.utils.clip_grad_norm_(self.value_head.parameters(), clip)
            self.value_opt.step()
            loss_sum, clipped = float(out.loss.detach()), float(out.clip_frac)
        with torch.no_grad():
            resid = returns - self.value_head(feats)
        sums = all_reduce_sums(
            {
                "loss": loss_sum,  # of the last epoch
                "clipped": clipped,
                "resid_sq": float((resid**2).sum()),
                "var": float(((returns - returns.mean()) ** 2).sum()) if returns.numel() else 0.0,
            }
        )
        return {
            "value_loss": sums["loss"] / n,
            "value_clip_frac": sums["clipped"] / n,
            "explained_var": 1.0 - sums["resid_sq"] / sums["var"] if sums["var"] > 0 else 0.0,
        }


def _cat(xs: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return torch.cat(xs) if xs else torch.zeros(0, dim)
