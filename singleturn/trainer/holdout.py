"""Held-out teacher-forced agreement during training: the number that chooses SFT's epoch count and lr.

    [eval]
    holdout_states = "data/selection/states-train-s100-n60.jsonl"   # `harness expert` on games kept out
    holdout_every = 15                                               # optimizer steps (and each stage's end)

Every `holdout_every` steps, and at the last step of every stage that trains a policy, the policy as
the evaluation builds it (eval.decoding, constraints, dtype, episodes in lockstep) answers every
held-out expert state given the expert's own history (teacher-forced), and the share of states where
it plays the expert's action is logged: a metrics.jsonl row of kind "holdout" (agreement, its 95%
Wilson interval, states, seconds, and `matches`, one 0/1 character per state in file order, so two
checkpoints can be paired state by state) and an `[holdout]` line. It runs right after the step and
before that step's checkpoint, so a run killed during it redoes it on resume and the row survives a
resume from that checkpoint.

The held-out states must come from games the run does not train on: an episode equal to a training
episode (same goal, observations and expert actions), or a game path the training states hold, is
refused before anything trains (`ConfigError`). Each game's states must be in step order, games apart
(as `harness expert` writes them).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from singleturn.harness import parse_action, read_states
from singleturn.model.policy import DTYPES
from singleturn.trainer.config import ConfigError
from singleturn.trainer.dist import barrier, broadcast_object, is_main
from singleturn.trainer.stats import wilson_interval


def trajectories(states: list[dict], source: str = "states") -> dict[str, list[dict]]:
    """game -> its states in step order; a game whose states are split apart or out of order is an
    error naming it (teacher forcing needs each episode whole)."""
    out: dict[str, list[dict]] = {}
    last = None
    for i, s in enumerate(states):
        game = s["game"]
        if game != last and game in out:
            raise ConfigError(f"{source}: the states of {game} are not contiguous (row {i + 1})")
        rows = out.setdefault(game, [])
        if int(s.get("step", len(rows))) != len(rows):
            raise ConfigError(f"{source}: {game} row {i + 1} has step {s.get('step')}, expected {len(rows)}")
        rows.append(s)
        last = game
    return out


def episode_key(states: list[dict]) -> str:
    """A digest of one expert episode: goal, every observation and expert action, in order."""
    blob = json.dumps([states[0].get("goal", "")] + [[s["observation"], s["expert_action"]] for s in states])
    return hashlib.sha256(blob.encode()).hexdigest()


def check_disjoint(held_out: dict[str, list[dict]], train_states: list[dict], source: str) -> None:
    """ConfigError when a held-out episode is also trained on (same game path, or the same episode)."""
    train: dict[str, list[dict]] = {}
    for row in train_states:  # grouped by game in file order: training data need no step order
        train.setdefault(row["game"], []).append(row)
    same_path = sorted(set(held_out) & set(train))
    train_keys = {episode_key(v) for v in train.values() if v}
    same_episode = sorted(g for g, v in held_out.items() if v and episode_key(v) in train_keys)
    if same_path or same_episode:
        shown = (same_path or same_episode)[:3]
        raise ConfigError(
            f"eval.holdout_states={source}: {len(set(same_path) | set(same_episode))} of its "
            f"{len(held_out)} episodes are in the training data (e.g. {shown}); held-out agreement "
            "needs games the run never trains on"
        )


def teacher_forced_actions(policy, trajectories: dict[str, list[dict]], batch_size: int) -> list[str]:
    """The policy's response at every expert state (teacher-forced: the expert's history), in
    trajectory order: `batch_size` games at a time in lockstep, as the evaluation plays them."""
    games = [g for g in trajectories if trajectories[g]]
    chosen: dict[tuple[str, int], str] = {}
    for i in range(0, len(games), batch_size):
        chunk = games[i : i + batch_size]
        for t in range(max(len(trajectories[g]) for g in chunk)):
            live = [trajectories[g][t] for g in chunk if t < len(trajectories[g])]
            for s, a in zip(live, policy.act_states(live)):
                chosen[(s["game"], t)] = a
    return [chosen[(g, t)] for g in trajectories for t in range(len(trajectories[g]))]


def agreement_matches(policy, trajectories: dict[str, list[dict]], batch_size: int) -> list[bool]:
    """Per state, in trajectory order: does the policy's (parsed) action equal the expert's?"""
    chosen = teacher_forced_actions(policy, trajectories, batch_size)
    states = [s for g in trajectories for s in trajectories[g]]
    return [parse_action(c, s["admissible"]) == s["expert_action"] for c, s in zip(chosen, states)]


def summarize(matches: list[bool]) -> dict:
    """agreement, its 95% Wilson interval, the count and the per-state 0/1 string."""
    n, k = len(matches), sum(matches)
    lo, hi = wilson_interval(k, n)
    return {
        "agreement": k / n,
        "agreement_lo": lo,
        "agreement_hi": hi,
        "states": n,
        "matches": "".join("1" if m else "0" for m in matches),
    }


def load_holdout(cfg, train_states_path) -> dict[str, list[dict]]:
    """eval.holdout_states as game -> states in step order ({} when unset), checked to be disjoint
    from the training states (ConfigError otherwise): called before anything trains."""
    source = cfg.eval.holdout_states
    if not source:
        return {}
    if not Path(source).is_file():
        raise ConfigError(f"eval.holdout_states={source}: no such file (write it with `harness expert`)")
    held_out = trajectories(read_states(source), source)
    check_disjoint(held_out, read_states(train_states_path), source)
    return held_out


class HoldoutAgreement:
    """Called by the Trainer after a step when `due` (all ranks call; rank 0 computes and logs)."""

    def __init__(
        self, held_out: dict[str, list[dict]], *, every, spec, model, fsdp, tokenizer, metrics, clock
    ):
        self.trajectories, self.every, self.spec = held_out, every, spec
        self.model, self.fsdp, self.tokenizer = model, fsdp, tokenizer
        self.metrics, self.clock = metrics, clock

    def due(self, step: int, stage_last: bool) -> bool:
        """Every `every` steps (0: never between) and at a stage's last step; never without states."""
        return bool(self.trajectories) and (stage_last or (self.every > 0 and step % self.every == 0))

    def __call__(self, stage: str, step: int) -> dict:
        t0 = time.perf_counter()
        row = None
        with self.fsdp.summon_full_params(dtype=DTYPES[self.spec.dtype]):
            if is_main():
                policy = self.spec.policy(self.model, self.tokenizer)
                try:
                    matches = agreement_matches(policy, self.trajectories, self.spec.batch_size)
                finally:
                    policy.close()  # its KV caches
                dt = time.perf_counter() - t0
                row = {"kind": "holdout", "stage": stage, "step": step, **summarize(matches), "seconds": dt}
                self.metrics.log(row)
                print(
                    f"[holdout] {stage} @ step {step}: agreement {row['agreement']:.3f} "
                    f"[{row['agreement_lo']:.3f}, {row['agreement_hi']:.3f}] on {row['states']} held-out "
                    f"expert states ({dt:.0f}s)",
                    flush=True,
                )
            barrier()
        self.clock.add("holdout", time.perf_counter() - t0)
        return broadcast_object(row)
