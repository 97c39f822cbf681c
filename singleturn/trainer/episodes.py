"""On-policy multi-turn episodes in the harness env workers, with what the RL losses need per turn
(the rollouts of the multi-turn baselines, trainer/stages/ppo.py and grpo_multiturn.py).

`collect_episodes` plays a list of games with the CURRENT policy, sampling (not greedy), through
`harness.rollout.run_episodes` (the same loop `harness.evaluate` and `collect_states` drive, on an
`EnvPool` of worker processes). Each turn records:
  - the prompt ids, exactly as the policy saw them (`trainer.rollout.sampling_policy`: the window
    format's prompt left-truncated to fit the context, counted; the episode format's whole episode),
  - the sampled response ids (stop token included) and their sampling log-probs (the behaviour
    policy of the PPO ratio),
  - the parsed action (None: invalid) and whether it equals the expert's action in that env state,
  - optionally the state feature for the critic (`trainer.value.state_features`).
Each episode records its success (the sparse reward), steps, invalid actions and env failures.

The full weights are gathered ONCE for the whole collection (`fsdp.summon_full_params`, in
rollout.dtype) and freed on exit; no collective runs inside, so ranks may play different numbers of
turns. Sampling seeds are a pure function of (run seed, step, rank, turn batch): reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from singleturn import harness
from singleturn.harness import parse_action
from singleturn.model.policy import DTYPES, prompt_budget
from singleturn.trainer.data import batch_indices, rank_slice
from singleturn.trainer.rollout import sampling_policy
from singleturn.trainer.value import state_features


@dataclass
class Turn:
    prompt: list[int]
    response: list[int]
    logprobs: torch.Tensor  # (len(response),) fp32 sampling log-probs (cpu)
    action: str | None
    """The admissible action the response named (None: invalid, the env got a no-op)."""
    expert_match: bool | None
    """action == the expert's action in this state (None when the expert offered none)."""


@dataclass
class EpisodeRollout:
    game: str
    task_type: str
    won: bool
    failed: bool
    """Env failure (crash/hang): the episode is dropped from training."""
    turns: list[Turn] = field(default_factory=list)
    features: torch.Tensor | None = None
    """(len(turns), D) fp32 critic features of each turn's state, when requested."""

    @property
    def steps(self) -> int:
        return len(self.turns)


@dataclass
class CollectStats:
    episodes: int
    env_steps: int
    samples: int
    """Sampled responses (one per turn): the sample budget unit."""
    response_tokens: int
    prompt_tokens: int
    truncated_prompts: int
    seconds: float


def _act_fn(model, tokenizer, rollout_cfg, *, fmt, max_prompt, rows, seed, pending, log):
    """The `run_episodes` act callable: one sampled response per live state, every turn recorded with
    its ids and sampling log-probs (`trainer.rollout.sampling_policy`, one cache row per live
    episode, keyed per episode so a group plays one game several times at once)."""
    policy = sampling_policy(
        model, tokenizer, rollout_cfg, fmt=fmt, max_prompt=max_prompt, rows=rows, seed=seed
    )

    def act(states: list[dict]) -> list[str | None]:
        before = policy.truncated
        episode_of = pending[-len(states) :]  # on_state ran once per state, in this order
        del pending[-len(states) :]
        policy.act_states(states, keys=episode_of)
        actions = []
        for i, (s, (prompt, c)) in enumerate(zip(states, policy.last)):
            action = parse_action(c.text, s["admissible"])
            match = None if s["expert_action"] is None else action == s["expert_action"]
            log[episode_of[i]].append(Turn(prompt, c.tokens, c.logprobs, action, match))
            actions.append(action)
        log["truncated"] += policy.truncated - before
        return actions

    return act, policy


def collect_episodes(
    model,
    fsdp,
    tokenizer,
    games: list[str],
    *,
    rollout_cfg,
    fmt,
    max_steps: int,
    max_seq_len: int,
    seed: int,
    device,
    num_workers: int = 1,
    batch_size: int | None = None,
    with_features: bool = False,
) -> tuple[list[EpisodeRollout], CollectStats]:
    """Play `games` (one episode each, in order; repeat a game for a group) with the sampling policy
    (`rollout_cfg`: `RolloutConfig`) in the prompt format `fmt` (`trainer.data.prompt_format`); with_features:
    also each turn's critic feature from the same gathered weights. Episodes in `games` order, counts."""
    # lazy: harness.rollout imports ALFWorld, which a run from a states file does not need
    from singleturn.harness.rollout import run_episodes

    t0 = time.perf_counter()
    log: dict = {i: [] for i in range(len(games))}
    log["truncated"] = 0
    pending: list[int] = []

    max_prompt = prompt_budget(max_seq_len, rollout_cfg.max_new_tokens)
    with fsdp.summon_full_params(dtype=DTYPES[rollout_cfg.dtype]), torch.no_grad():
        rows = batch_size or 8 * num_workers  # run_episodes' live episodes at once
        act, policy = _act_fn(
            model,
            tokenizer,
            rollout_cfg,
            fmt=fmt,
            max_prompt=max_prompt,
            rows=rows,
            seed=seed,
            pending=pending,
            log=log,
        )
        try:
            played = run_episodes(
                games,
                act,
                max_steps=max_steps,
                num_workers=num_workers,
                batch_size=rows,
                on_state=lambda state, index: pending.append(index),
            )
        finally:
            policy.close()  # its KV caches
        episodes = [
            EpisodeRollout(game=ep.game, task_type=ep.task_type, won=ep.won, failed=ep.failed, turns=log[i])
            for i, ep in enumerate(played)
        ]
        if with_features:
            _add_features(model, episodes, device)
    return episodes, _stats(episodes, log["truncated"], time.perf_counter() - t0)


def _add_features(model, episodes: list[EpisodeRollout], device) -> None:
    """Set each episode's critic features (one row per turn), from the weights gathered now."""
    prompts = [t.prompt for ep in episodes for t in ep.turns]
    feats = state_features(model, prompts, device=device)  # (n, D)
    start = 0
    for ep in episodes:
        ep.features = feats[start : start + len(ep.turns)]
        start += len(ep.turns)


def _stats(episodes: list[EpisodeRollout], truncated: int, seconds: float) -> CollectStats:
    turns = [t for ep in episodes for t in ep.turns]
    return CollectStats(
        episodes=len(episodes),
        env_steps=sum(ep.steps for ep in episodes),
        samples=len(turns),
        response_tokens=sum(len(t.response) for t in turns),
        prompt_tokens=sum(len(t.prompt) for t in turns),
        truncated_prompts=truncated,
        seconds=seconds,
    )


def train_games(data_cfg) -> list[str]:
    """The train-split game files the multi-turn stages play (the games the expert states came from):
    this run's own generation (`harness.generation_dir`) when the trainer generated it, else every
    train game under data.games_dir (games given with data.states_path, or the official layout)."""
    own = harness.generation_dir(data_cfg.games_dir, "train", data_cfg.train_games, data_cfg.games_seed)
    root = own if (own / "manifest.json").is_file() else Path(data_cfg.games_dir)  # not another run's
    games = [str(g) for g in harness.find_games(root, "train")]
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
