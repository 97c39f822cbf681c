"""The `grpo-dagger` stage: single-turn GRPO on the policy's own states, labelled by the expert.

The expert-state bound of single-turn GRPO says nothing about states the expert never visits, and
compounding errors live there. DAgger's fix, in GRPO's terms: every K = dagger.every steps the
CURRENT policy plays `dagger.episodes` train games, `harness.collect_states` (with the policy) labels
every state it visits with the expert's action in that state, and those states join a policy-state
pool next to the fixed expert states. Reward (1{action == expert action}), group advantages, dynamic
sampling and the update are grpo's (trainer/stages/grpo.py, trainer/update.py); only `batch` differs.

- Play: the rollout's sampling policy (rollout.temperature / top_p / top_k, full weights gathered
  once in rollout.dtype), not the evaluation's deterministic decoding: it is the behaviour policy
  GRPO trains, it visits the greedy policy's mistakes and the off-track states sampling reaches, and
  repeated refreshes of similar weights do not replay one trajectory. Seeds are a pure function of
  (run seed, global step, rank) and the games of refresh r of (data seed, r), so the same step and
  seed give the same states. Ranks play a strided share of the games; the rows are gathered in
  rank order, so every rank holds the same pool.
- Schedule: refreshes run before stage steps K-1, 2K-1, ... (steps 0..K-2 use expert states only):
  n steps play n // K refreshes, so `samples_per_step` (grpo's + ceil(episodes * max_steps / K))
  bounds the stage's draw and the comparison's budget // samples_per_step steps never overspend.
- Pool: at most dagger.pool_size states, FIFO (a refresh appends in game, step order and evicts the
  oldest first), saved in the checkpoint's stage state. Each step's global batch of B = batch_size *
  oversample states takes k = min(round(mix_ratio * B), pool size) distinct pool states (seeded by
  (data seed, step)) and the first B - k of grpo's expert batch, shuffled together (same seed) so
  every rank's slice mixes both; k = 0 is exactly grpo's batch.
- Budget: each play decision is a sampled response and each labelled state one env step (an episode
  an env failure ends is dropped by collect_states, its steps still counted); rows report `samples`
  (GRPO responses + play decisions), `env_steps` and the play's training-episode win rate
  (`dagger_win_rate`), like the multi-turn stages.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from singleturn.harness import collect_states, read_states
from singleturn.model.policy import DTYPES, prompt_budget
from singleturn.trainer.data import Example, batch_indices, build_examples, prompt_format, rank_slice
from singleturn.trainer.dist import all_reduce_sums, broadcast_object
from singleturn.trainer.episode_data import build_episode_examples
from singleturn.trainer.episodes import train_games
from singleturn.trainer.rollout import rollout_seed, sampling_policy
from singleturn.trainer.stages.base import StageContext, StageSpan, register
from singleturn.trainer.stages.grpo import GRPOStage


def refresh_due(i: int, every: int) -> bool:
    """Whether stage step i (0-based) starts with a refresh: steps K-1, 2K-1, ..."""
    return (i + 1) % every == 0


def refresh_games(
    games: list[str], refresh: int, *, episodes: int, seed: int, rank: int, world: int
) -> list[str]:
    """This rank's games of refresh `refresh` (0-based): `episodes` games of the seeded epoch stream
    (trainer.data.batch_indices), rank r playing every world-th from r."""
    idx = batch_indices(refresh, episodes, len(games), seed)
    return [games[j] for j in idx[rank::world]]


def policy_share(n: int, ratio: float, pool_len: int) -> int:
    """Policy states in a batch of n: round(ratio * n) (half up), at most the pool's size."""
    return min(math.floor(ratio * n + 0.5), pool_len)


class PolicyPool:
    """The policy-state pool: at most `capacity` examples, first in first out."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.examples: list[Example] = []

    def __len__(self) -> int:
        return len(self.examples)

    def add(self, examples: list[Example]) -> int:
        """Append `examples` in order, evict the oldest beyond capacity; returns how many went."""
        merged = self.examples + list(examples)
        evicted = max(0, len(merged) - self.capacity)
        self.examples = merged[evicted:]
        return evicted


def mixed_batch(
    expert: list[Example], pool: PolicyPool, i: int, n: int, *, ratio: float, seed: int
) -> list[Example]:
    """The global rollout batch of stage step i: k = policy_share(n, ratio, len(pool)) pool states
    drawn without replacement and the first n - k of grpo's expert batch (batch_indices(i, n)),
    shuffled together; both draws are seeded by (seed, i). k = 0: grpo's batch, in its order."""
    k = policy_share(n, ratio, len(pool))
    out = [expert[j] for j in batch_indices(i, n, len(expert), seed)[: n - k]]
    if k == 0:
        return out
    rng = np.random.default_rng([seed, i, 0xDA66])
    out += [pool.examples[j] for j in rng.choice(len(pool), size=k, replace=False)]
    return [out[j] for j in rng.permutation(n)]


def play_policy_states(
    model,
    fsdp,
    tokenizer,
    games: list[str],
    *,
    rollout_cfg,
    fmt,
    max_steps: int,
    num_workers: int,
    seed: int,
) -> tuple[list[dict], dict]:
    """Play `games` (one episode each) with the sampling policy; every visited state, labelled with
    the expert's action (harness.collect_states with a policy). Returns (states.jsonl rows in games
    order, steps in order; counts: decisions = sampled responses, env_steps = the env steps taken
    (= labelled states, plus the steps of episodes an env failure ended, whose states are dropped),
    won / env_failures = episodes, truncated prompts, response tokens). Collective (the weights are gathered) even without games."""
    max_prompt = prompt_budget(model.config.max_seq_len, rollout_cfg.max_new_tokens)
    rows: list[dict] = []
    played: list = []
    with fsdp.summon_full_params(dtype=DTYPES[rollout_cfg.dtype]), torch.no_grad():
        # Built on the gathered weights (the episode format's caches take their dtype); rows: the live
        # episodes run_episodes plays at once.
        policy = sampling_policy(
            model, tokenizer, rollout_cfg, fmt=fmt, max_prompt=max_prompt, rows=8 * num_workers, seed=seed
        )
        if games:
            with tempfile.TemporaryDirectory(prefix="dagger-") as tmp:
                path = Path(tmp) / "states.jsonl"
                n = collect_states(
                    games,
                    path,
                    policy=policy,
                    max_steps=max_steps,
                    num_workers=num_workers,
                    prompt=fmt.kind,
                    history_window=fmt.history_window,
                    system_prompt=fmt.system_prompt,
                    list_admissible=fmt.list_admissible,
                    seed=seed,
                    episodes=played,
                    batch_size=8 * num_workers,  # the policy's cache rows
                )
                rows = read_states(path) if n else []
    policy.close()  # its KV caches
    counts = {
        "decisions": policy.decisions,
        "states": len(rows),
        "env_steps": sum(e.steps for e in played),  # every env step, an env-failed episode's too
        "won": sum(e.won for e in played),
        "env_failures": sum(e.failed for e in played),
        "truncated": policy.truncated,
        "response_tokens": policy.response_tokens,
    }
    return rows, counts


def _gather_rows(rows: list[dict], rank: int, world: int) -> list[dict]:
    """Every rank's rows, in rank order, on every rank (one broadcast per rank)."""
    out: list[dict] = []
    for src in range(world):
        out += broadcast_object(rows if src == rank else None, src=src)
    return out


@register
class GRPODaggerStage(GRPOStage):
    name = "grpo-dagger"
    section = "grpo"
    label = "SFT+GRPO-DAgger"
    method = "GRPO (single-turn, + policy states)"
    log_keys = ("loss", "reward_mean", "pass_at_g", "zero_var_groups", "pool_size", "kl", "response_len")

    def __init__(self, ctx: StageContext, span: StageSpan):
        super().__init__(ctx, span)
        self.ctx = ctx
        self.games = train_games(ctx.cfg.data)
        self.pool = PolicyPool(ctx.cfg.dagger.pool_size)

    @classmethod
    def samples_per_step(cls, cfg) -> int:
        d = cfg.dagger  # n steps play n // K refreshes of at most episodes * max_steps decisions
        return super().samples_per_step(cfg) + math.ceil(d.episodes * d.max_steps / d.every)

    @classmethod
    def samples(cls, cfg, rows: list[dict]) -> int:
        return sum(int(r.get("samples", 0)) for r in rows)

    def batch(self, ctx: StageContext, i: int) -> list[Example]:
        c = ctx.cfg
        n = c.grpo.batch_size * c.grpo.oversample
        batch = mixed_batch(ctx.examples, self.pool, i, n, ratio=c.dagger.mix_ratio, seed=c.data.seed)
        return rank_slice(batch, ctx.info.rank, ctx.info.world_size)

    def refresh(self, ctx: StageContext, i: int) -> dict:
        """Play refresh (i + 1) // K - 1 with the current policy, add its labelled states to the pool."""
        c, d, info = ctx.cfg, ctx.cfg.dagger, ctx.info
        games = refresh_games(
            self.games,
            (i + 1) // d.every - 1,
            episodes=d.episodes,
            seed=c.data.seed,
            rank=info.rank,
            world=info.world_size,
        )
        rows, counts = play_policy_states(
            ctx.model,
            ctx.fsdp,
            ctx.tokenizer,
            games,
            rollout_cfg=c.rollout,
            fmt=prompt_format(c.data),
            max_steps=d.max_steps,
            num_workers=d.num_workers,
            seed=rollout_seed(c.run.seed, self.span.first + i, info.rank) ^ 0x2DA66,  # not the rollout's
        )
        examples, dropped = self._examples(_gather_rows(rows, info.rank, info.world_size))
        evicted = self.pool.add(examples)
        sums = all_reduce_sums({"episodes": float(len(games)), **{k: float(v) for k, v in counts.items()}})
        return {
            "dagger_episodes": int(sums["episodes"]),
            "dagger_states": int(sums["states"]),
            "dagger_won": int(sums["won"]),
            "dagger_win_rate": sums["won"]
            / max(sums["episodes"], 1.0),  # the play's training-episode win rate
            "dagger_env_failures": int(sums["env_failures"]),
            "dagger_added": len(examples),
            "dagger_dropped": dropped,
            "dagger_evicted": evicted,
            "dagger_truncated_prompts": int(sums["truncated"]),
            "play_samples": int(sums["decisions"]),
            "env_steps": int(sums["env_steps"]),
        }

    def _examples(self, rows: list[dict]) -> tuple[list[Example], int]:
        """Pool examples of state rows, tokenized like the expert states (too long: dropped, counted)."""
        c = self.ctx.cfg
        max_seq_len = min(c.data.max_seq_len, self.ctx.model.config.max_seq_len)
        if c.data.prompt == "episode":  # the played episodes' per-state prompts in the episode format
            _, examples, dropped = build_episode_examples(
                rows,
                self.ctx.tokenizer,
                list_admissible=c.data.list_admissible,
                system_prompt=c.data.system_prompt,
                max_seq_len=max_seq_len,
            )
            return examples, dropped
        return build_examples(
            rows,
            self.ctx.tokenizer,
            history_window=c.data.history_window,
            system_prompt=c.data.system_prompt,
            max_seq_len=max_seq_len,
        )

    def step(self, ctx: StageContext, i: int) -> dict:
        t0 = time.perf_counter()
        play = self.refresh(ctx, i) if refresh_due(i, ctx.cfg.dagger.every) else {}
        t_play = time.perf_counter() - t0
        row = super().step(ctx, i)
        n = ctx.cfg.grpo.batch_size * ctx.cfg.grpo.oversample
        row.update(play)
        row.update(
            samples=row["groups"] * ctx.cfg.rollout.group_size + play.get("play_samples", 0),
            env_steps=play.get("env_steps", 0),
            policy_states=policy_share(n, ctx.cfg.dagger.mix_ratio, len(self.pool)),
            pool_size=len(self.pool),
            time_dagger=t_play,
        )
        return row

    def state_dict(self) -> dict:
        return {"pool": [e.state for e in self.pool.examples]}

    def load_state_dict(self, state: dict) -> None:
        self.pool.examples = self._examples(state.get("pool", []))[0]
