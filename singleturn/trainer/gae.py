"""Generalized advantage estimation over episode turns, the value loss, advantage whitening.

The multi-turn PPO baseline treats one *turn* (prompt -> response -> env step) as one MDP step:
the state is the rendered prompt, the action the whole response. The only reward is the episode's
success, paid at its last turn (optionally discounted by its length so short successes score higher):

    r_t     = 0 for t < L-1,   r_{L-1} = won * success_discount ** (L-1)
    delta_t = r_t + gamma * V_{t+1} - V_t            (V_L = last_value: 0 when the episode ended)
    A_t     = delta_t + gamma * lam * A_{t+1}        (A_L = 0)
    R_t     = A_t + V_t                              (the value target, lam-return)

Every action token of turn t gets A_t (the caller broadcasts it). Padded turns (mask 0) get 0.

Value loss (PPO2 / verl style, optional clipping around the rollout-time values):
    unclipped_t = (V_t - R_t)^2
    clipped_t   = (V_old_t + clamp(V_t - V_old_t, -eps, eps) - R_t)^2
    loss        = 0.5 * sum_t max(unclipped_t, clipped_t)     (a SUM; the caller normalizes)

References: Schulman et al. 2016 (GAE); Schulman et al. 2017 (PPO); verl `core_algos.py`
(compute_gae_advantage_return, compute_value_loss); Wang et al. 2025 (RAGEN, turn-level rewards).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist


def episode_returns(
    won: torch.Tensor, lengths: torch.Tensor, *, success_discount: float = 1.0
) -> torch.Tensor:
    """The sparse episode reward [B] fp32: won * success_discount**(L-1) (0 for an empty episode).

    The one formula of the multi-turn baselines: PPO puts it at the last turn (`episode_rewards`),
    trajectory-level GRPO normalizes it within each group of episodes.
    """
    lengths = lengths.long()
    last = (lengths - 1).clamp(min=0)  # (B,)
    value = won.float() * success_discount ** last.float()  # (B,)
    return torch.where(lengths > 0, value, torch.zeros_like(value))  # empty episode: no reward


def episode_rewards(
    won: torch.Tensor, lengths: torch.Tensor, num_turns: int, *, success_discount: float = 1.0
) -> torch.Tensor:
    """Sparse per-turn rewards [B, T] fp32: won * success_discount**(L-1) at each episode's last turn.

    won [B] bool/float, lengths [B] int (turns taken, >= 0; an empty episode gets no reward).
    """
    B = won.shape[0]
    lengths = lengths.long()
    out = torch.zeros(B, num_turns, dtype=torch.float32)
    if num_turns == 0:
        return out
    last = (lengths - 1).clamp(min=0)  # (B,)
    out[torch.arange(B), last] = episode_returns(won, lengths, success_discount=success_discount)
    return out


def turn_mask(lengths: torch.Tensor, num_turns: int) -> torch.Tensor:
    """Bool [B, T]: True on the first lengths[b] turns of episode b."""
    return torch.arange(num_turns)[None, :] < lengths.long()[:, None]


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    last_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, T], returns [B, T]) fp32 by GAE over turns; see the module docstring.

    rewards, values [B, T] float; mask [B, T] bool with each row's valid turns a prefix.
    last_values [B]: V of the state after each episode's last turn (None: 0, i.e. terminal; pass
    V(s_L) to bootstrap an episode cut by the step limit). Masked entries come out exactly 0.
    Computed in fp64 (a T-step recurrence), returned as fp32; values are treated as constants.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"shapes differ: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, mask {tuple(mask.shape)}"
        )
    B, T = rewards.shape
    r = rewards.detach().double()
    v = values.detach().double()
    m = mask.bool()
    boot = (
        torch.zeros(B, dtype=torch.float64)
        if last_values is None
        else last_values.detach().double().reshape(B)
    )
    adv = torch.zeros(B, T, dtype=torch.float64)
    next_adv = torch.zeros(B, dtype=torch.float64)
    next_value = boot.clone()
    for t in reversed(range(T)):
        # A row's next valid turn is t+1 if mask[:, t+1] else the episode ended at t: bootstrap.
        if t + 1 < T:
            nxt = m[:, t + 1]
            next_value = torch.where(nxt, v[:, t + 1], boot)
            next_adv = torch.where(nxt, adv[:, t + 1], torch.zeros_like(boot))
        else:
            next_value, next_adv = boot, torch.zeros_like(boot)
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv[:, t] = torch.where(m[:, t], delta + gamma * lam * next_adv, torch.zeros_like(delta))
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv.float(), returns.float()


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor  # () fp32 SUM over valid entries (differentiable in values)
    clip_frac: torch.Tensor  # () fp32: number of entries where the clipped branch was taken (detached)
    num: torch.Tensor  # () int64: valid entries


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    *,
    old_values: torch.Tensor | None = None,
    clip_eps: float = 0.0,
    mask: torch.Tensor | None = None,
) -> ValueLossOutput:
    """0.5 * sum (V - R)^2, PPO-clipped around old_values when clip_eps > 0; any matching shapes.

    values (differentiable), returns, old_values, mask: the same shape. Masked entries add exactly 0
    to the loss and get exactly zero gradient.
    """
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    if clip_eps > 0 and old_values is None:
        raise ValueError("clip_eps > 0 needs old_values")
    m = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    ret = returns.detach().to(values.dtype)
    err = (values - ret) ** 2
    clipped = torch.zeros_like(m)
    if clip_eps > 0:
        old = old_values.detach().to(values.dtype)
        v_clip = old + torch.clamp(values - old, -clip_eps, clip_eps)
        err_clip = (v_clip - ret) ** 2
        clipped = m & (err_clip > err)
        err = torch.maximum(err, err_clip)
    loss = 0.5 * torch.where(m, err, torch.zeros_like(err)).sum()
    return ValueLossOutput(loss, clipped.float().sum().detach(), m.sum())


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8, all_reduce=None) -> torch.Tensor:
    """(x - mean) / (std + eps) over the valid entries (population std); masked entries -> 0.

    all_reduce: optional callable summing a float64 tensor over ranks (trainer.dist.all_reduce_sum),
    so every rank whitens with the GLOBAL mean/std. Fewer than 2 valid entries or zero spread: only
    the mean is removed (dividing a zero std by eps would blow the advantages up), so a constant batch
    becomes exactly 0.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float64)
    xd = torch.where(m, x.double(), zero)
    stats = torch.stack([xd.sum(), m.sum().double()])  # (2,) fp64
    if all_reduce is not None:
        stats = all_reduce(stats)
    total, n = float(stats[0]), float(stats[1])  # host sync: decides the branch
    if n == 0:
        return torch.zeros_like(x)
    xv = x.double()
    hi = torch.stack(
        [xv.masked_fill(~m, -math.inf).max(), (-xv).masked_fill(~m, -math.inf).max()]
    )  # max, -min
    if all_reduce is not None:
        hi = _all_reduce_max(hi)
    if float(hi[0]) == -float(hi[1]):  # all valid entries equal: exactly 0 (x - mean may be 1e-17, not 0)
        return torch.zeros_like(x)
    centered = torch.where(m, x.double() - total / n, zero)
    # Second pass on the centered values (not E[x^2] - E[x]^2): a constant batch gives exactly 0.
    sq = centered.pow(2).sum()
    if all_reduce is not None:
        sq = all_reduce(sq)
    var = float(sq) / n if n > 1 else 0.0
    out = centered / (var**0.5 + eps) if var > 0 else centered
    return out.to(x.dtype)


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks (a copy; no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    y = t.to(dev, copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y.to(t.device)
