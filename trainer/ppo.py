"""The paper's multi-turn baselines: `ppo` (sparse episode reward + GAE critic) and `grpo-multiturn`.

Both are stages of the same run as `sft` / `grpo` (trainer/runner.py dispatches on the stage name)
and share everything but the advantage: one rollout batch = episodes played in the harness env
workers with the current sampling policy (trainer/multiturn.py); every turn becomes one sequence
(its prompt, its sampled response, the sampling log-probs) and the policy loss is the SAME
`grpo_forward_backward` as single-turn GRPO (kernels.grpo_loss: fused log-probs, clipped ratio,
normalized by the global action-token count, FSDP micro-batch padding across ranks), with a
per-turn advantage broadcast to the turn's action tokens:

- `ppo`: reward = won * success_discount**(L-1) at the last turn; a value head on the policy's
  final hidden state at each turn's state (trainer/value.py) gives V; turn-level GAE
  (trainer/gae.py) gives A_t and the returns; A is whitened over the global batch; the value head
  is regressed on the returns (clipped value loss) with its own AdamW.
- `grpo-multiturn` (trajectory-level GRPO, as in the GiGPO paper's baseline): G episodes of the same
  game; the episode reward is normalized in its group (kernels.group_advantages) and applied to all
  of the episode's action tokens; zero-variance groups are dropped (counted).

Sample budget: one turn = one sampled response; rows report `samples` (global) so the comparison
can match methods on samples. Env failures are dropped from training (counted). Episodes cut by the
step limit are treated as terminal (reward 0, no bootstrap: the state after the last turn is never
rendered). The value head is replicated (identical on every rank); it and its AdamW state travel in
the checkpoint's per-rank `extra` (`state_dict()` / `load_state_dict()`), so a resumed `ppo` stage
continues with the same critic.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from trainer.data import batch_indices, rank_slice
from trainer.dist import all_reduce_sum
from trainer.gae import compute_gae, episode_rewards, masked_whiten, turn_mask, value_loss
from trainer.grpo import GRPOBatch, Sequence, global_response_tokens, grpo_forward_backward, micro_batches
from trainer.loop import lr_at
from trainer.multiturn import EpisodeRollout, collect_episodes
from trainer.rollout import rollout_seed

MULTITURN_STAGES = ("ppo", "grpo-multiturn")


def train_games(data_cfg) -> list[str]:
    """The train-split game files the multi-turn stages play (the games the expert states came from)."""
    from harness import find_games

    games = [str(g) for g in find_games(Path(data_cfg.games_dir), "train")]
    if not games:
        raise FileNotFoundError(f"no train games under {data_cfg.games_dir!r} for the multi-turn stages")
    return games


def step_games(
    games: list[str], step_in_stage: int, *, episodes: int, group_size: int, seed: int, rank: int, world: int
) -> list[str]:
    """This rank's games for one rollout batch: `episodes // group_size` distinct games (a pure
    function of the step, like the single-turn sampler), each repeated group_size times, contiguous."""
    distinct = batch_indices(step_in_stage, episodes // group_size, len(games), seed)
    local = rank_slice(distinct, rank, world)
    return [games[i] for i in local for _ in range(group_size)]


def _dummy(episodes: list[EpisodeRollout], eot_id: int) -> Sequence:
    """A zero-weight sequence for FSDP micro-batch padding (any real turn, else a 1-token stub)."""
    for ep in episodes:
        for t in ep.turns:
            if t.response:
                return Sequence(t.prompt, t.response, t.logprobs, 0.0)
    return Sequence([eot_id], [eot_id], torch.zeros(1), 0.0)


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


def group_episode_advantages(
    episodes: list[EpisodeRollout], group_size: int, *, success_discount: float, adv_scale: str
):
    """Trajectory-level GRPO: (per-episode advantage [B*G] fp32, zero-variance groups). Episodes come
    group-contiguous; an env-failed episode counts as reward 0 in its group (and is not trained on)."""
    from kernels.group_advantages import group_advantages
    from trainer.reward import zero_variance_groups

    rewards = torch.tensor(
        [float(ep.won) * success_discount ** max(ep.steps - 1, 0) for ep in episodes], dtype=torch.float32
    )  # (B*G,)
    adv = group_advantages(rewards, group_size, scale=adv_scale)
    return adv, int(zero_variance_groups(rewards, group_size).sum())


class MultiTurnStage:
    """One rollout batch + update of `ppo` or `grpo-multiturn` on a `StepRunner`'s model/optimizer."""

    def __init__(self, runner, algo: str, *, ppo_cfg, rollout_cfg, data_cfg, run_seed: int):
        if algo not in MULTITURN_STAGES:
            raise ValueError(f"unknown multi-turn algorithm {algo!r}; choose from {MULTITURN_STAGES}")
        self.r, self.algo = runner, algo
        self.cfg, self.rollout_cfg, self.data_cfg, self.run_seed = ppo_cfg, rollout_cfg, data_cfg, run_seed
        self.games = train_games(data_cfg)
        self.group = ppo_cfg.group_size if algo == "grpo-multiturn" else 1
        self.value_head = self.value_opt = None
        if algo == "ppo":
            from trainer.value import ValueHead

            with torch.random.fork_rng(devices=[]):  # same head on every rank; the run's RNG untouched
                torch.manual_seed(run_seed)
                self.value_head = ValueHead(runner.model.config.dim, hidden_dim=ppo_cfg.value_hidden_dim)
            self.value_opt = torch.optim.AdamW(
                self.value_head.parameters(), lr=ppo_cfg.value_lr, weight_decay=0.0
            )

    def state_dict(self) -> dict:
        """The critic (value head + its AdamW) for the checkpoint's `extra`; empty for grpo-multiturn."""
        if self.value_head is None:
            return {}
        return {"value_head": self.value_head.state_dict(), "value_opt": self.value_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; a checkpoint without a critic must not resume `ppo`."""
        if self.value_head is None:
            return
        if "value_head" not in state or "value_opt" not in state:
            raise ValueError(
                "resuming a ppo stage: the checkpoint holds no value head (written mid-ppo by an older version?)"
            )
        self.value_head.load_state_dict(state["value_head"])
        self.value_opt.load_state_dict(state["value_opt"])

    def step(self, step: int, step_in_stage: int, total: int) -> dict:
        r, c, info = self.r, self.cfg, self.r.info
        t0 = time.perf_counter()
        games = step_games(
            self.games, step_in_stage, episodes=c.episodes_per_step, group_size=self.group,
            seed=self.data_cfg.seed, rank=info.rank, world=info.world_size,
        )  # fmt: skip
        episodes, cs = collect_episodes(
            r.model,
            r.fsdp,
            r.tokenizer,
            games,
            rollout_cfg=self.rollout_cfg,
            history_window=self.data_cfg.history_window,
            system_prompt=self.data_cfg.system_prompt,
            max_steps=c.max_steps,
            max_seq_len=r.model.config.max_seq_len,
            seed=rollout_seed(self.run_seed, step, info.rank),
            device=info.device,
            num_workers=c.num_workers,
            with_features=self.algo == "ppo",
        )
        t_roll = time.perf_counter() - t0
        t1 = time.perf_counter()
        kept, extra = self._sequences(episodes)
        batch = GRPOBatch(kept, _dummy(episodes, r.tokenizer.eot_id), extra.get("zero_var_groups", 0))
        turns = [t for ep in episodes for t in ep.turns]
        labeled = [t for t in turns if t.expert_match is not None]
        sums = all_reduce_sum(
            torch.tensor(
                [
                    float(sum(ep.won for ep in episodes)),
                    float(len(episodes)),
                    float(cs.samples),
                    float(sum(t.action is None for t in turns)),
                    float(sum(bool(t.expert_match) for t in labeled)),
                    float(len(labeled)),
                    float(sum(ep.failed for ep in episodes)),
                    float(len(kept)),
                    float(cs.response_tokens),
                    float(cs.prompt_tokens),
                    float(batch.zero_var_groups),
                    float(cs.truncated_prompts),
                ],
                dtype=torch.float64,
            )
        )
        n_samples = max(float(sums[2]), 1.0)
        row = {
            "reward_mean": float(sums[0] / max(float(sums[1]), 1.0)),
            "success_rate": float(sums[0] / max(float(sums[1]), 1.0)),
            "episodes": int(sums[1]),
            "samples": int(sums[2]),
            "env_steps": int(sums[2]),
            "episode_len": float(sums[2] / max(float(sums[1]), 1.0)),
            "invalid_rate": float(sums[3] / n_samples),
            "action_accuracy": float(sums[4] / max(float(sums[5]), 1.0)),
            "env_failures": int(sums[6]),
            "kept_sequences": int(sums[7]),
            "response_len": float(sums[8] / n_samples),
            "zero_var_groups": int(sums[10]),
            "truncated_prompts": int(sums[11]),
            "time_rollout": t_roll,
            **extra.get("row", {}),
        }
        if int(sums[7]) == 0:
            # Nothing to learn from (every group had zero reward variance, or no turn survived).
            row.update(skipped=True, skip_reason="no_sequences", loss=0.0, clip_frac=0.0, kl=0.0)
            r.skipped_steps += 1
        else:
            n_tok = global_response_tokens(batch)
            mbs = micro_batches(batch, c.micro_batch_size)
            lr = lr_at(r.cfg.optim, c.lr or r.cfg.optim.lr, step_in_stage, total)
            for _ in range(c.ppo_epochs):
                stats = grpo_forward_backward(
                    r.model, r.head, mbs, global_tokens=n_tok, clip_eps_low=c.clip_eps_low,
                    clip_eps_high=c.clip_eps_high, kl_coef=0.0, temperature=self.rollout_cfg.temperature,
                    pad_id=r.tokenizer.pad_id, device=info.device,
                )  # fmt: skip
                norm, ok = r._apply_update(lr, stats["nonfinite"])
            row.update(stats, grad_norm=norm, lr=lr, skipped=not ok, num_tokens=int(n_tok))
        if self.algo == "ppo":
            row.update(self._update_value(extra["features"], extra["returns"], extra["old_values"]))
        dt = time.perf_counter() - t1
        tokens = float(sums[8] + sums[9])
        row.update(time_train=dt, tokens_per_s=tokens * c.ppo_epochs / max(dt, 1e-9) / info.world_size)
        return row

    # ---------------------------------------------------------------------------------------------
    def _sequences(self, episodes: list[EpisodeRollout]) -> tuple[list[Sequence], dict]:
        """Training sequences (one per turn, per-turn advantage) and what the value update needs."""
        c = self.cfg
        if self.algo == "grpo-multiturn":
            adv, zero_var = group_episode_advantages(
                episodes, self.group, success_discount=c.success_discount, adv_scale=c.adv_scale
            )
            kept = [
                Sequence(t.prompt, t.response, t.logprobs, float(adv[i]))
                for i, ep in enumerate(episodes)
                if not ep.failed and not self._zero_group(adv, i)
                for t in ep.turns
                if t.response
            ]
            return kept, {"zero_var_groups": zero_var}
        live = [ep for ep in episodes if not ep.failed and ep.turns]
        with torch.no_grad():
            values = [self.value_head(ep.features) for ep in live]  # [L] fp32 each
        advs, rets = ppo_advantages(live, values, c, all_reduce=all_reduce_sum)
        kept = [
            Sequence(t.prompt, t.response, t.logprobs, float(a))
            for ep, adv in zip(live, advs)
            for t, a in zip(ep.turns, adv.tolist())
            if t.response and a != 0.0  # a zero advantage adds no gradient, only cost
        ]
        cat = lambda xs, d=0: torch.cat(xs) if xs else torch.zeros(0, d)  # noqa: E731
        dim = self.value_head.dim
        v_all = cat(values)
        row = {"value_mean": float(v_all.mean()) if v_all.numel() else 0.0}
        return kept, {
            "features": cat([ep.features for ep in live], dim),
            "returns": cat(rets).reshape(-1),
            "old_values": v_all.reshape(-1),
            "row": row,
        }

    def _zero_group(self, adv: torch.Tensor, i: int) -> bool:
        g = i // self.group
        return bool((adv[g * self.group : (g + 1) * self.group] == 0).all())

    def _update_value(self, feats: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor) -> dict:
        """value_epochs full-batch AdamW steps of the clipped value loss (global mean over turns)."""
        from trainer.value import sync_grads

        c = self.cfg
        n = max(all_reduce_sum(float(returns.numel())), 1.0)  # host sync: the global normalizer
        clip = self.r.cfg.optim.grad_clip or float("inf")
        last = torch.zeros(2, dtype=torch.float64)
        for _ in range(c.value_epochs):
            out = value_loss(self.value_head(feats), returns, old_values=old_values, clip_eps=c.value_clip)
            self.value_opt.zero_grad(set_to_none=False)
            (out.loss / n).backward()
            sync_grads(self.value_head)  # replicated head: identical summed gradients on every rank
            torch.nn.utils.clip_grad_norm_(self.value_head.parameters(), clip)
            self.value_opt.step()
            last = torch.tensor([float(out.loss.detach()), float(out.clip_frac)], dtype=torch.float64)
        last = all_reduce_sum(last)  # (loss sum, clipped count) of the last epoch, over ranks
        with torch.no_grad():
            resid = returns - self.value_head(feats)
        ev = all_reduce_sum(
            torch.tensor(
                [
                    float((resid**2).sum()),
                    float(((returns - returns.mean()) ** 2).sum()) if returns.numel() else 0.0,
                ],
                dtype=torch.float64,
            )
        )
        return {
            "value_loss": float(last[0]) / n,
            "value_clip_frac": float(last[1]) / n,
            "explained_var": 1.0 - float(ev[0] / ev[1]) if float(ev[1]) > 0 else 0.0,
        }
