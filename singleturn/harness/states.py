"""Expert episodes -> states.jsonl, the seam between the harness and the trainer.

One JSON object per expert step: {game, task_type, step, goal, history: [[observation, action],
...], observation, admissible, expert_action}. `history` holds every earlier (observation, action)
pair of the episode; `render_prompt` shows the last K of them.

DAgger-style labelling is the same call with a `policy`: the policy (batched, messages -> text)
chooses the actions, so the visited states are the policy's, and every row is labelled with the
expert's action in that state (the expert observes the policy's actions and re-plans from them).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from singleturn.harness.progress import Progress
from singleturn.harness.prompts import PromptFormat, policy_actions

STATE_KEYS = ("game", "task_type", "step", "goal", "history", "observation", "admissible", "expert_action")


def collect_states(
    games,
    out_jsonl,
    expert: str = "handcoded",
    *,
    policy=None,
    beta: float = 0.0,
    max_steps: int = 50,
    num_workers: int = 1,
    history_window: int = 3,
    system_prompt: bool = True,
    prompt: str = "window",
    list_admissible: bool = True,
    seed: int = 0,
    only_won: bool = True,
    episodes: list | None = None,
    batch_size: int | None = None,
) -> int:
    """Play `games` and write one row per visited state to `out_jsonl`; returns the row count.

    Without `policy` the expert acts (expert states). With `policy` (list[messages] -> list[str])
    the policy acts, except with probability `beta` per step where the expert does (DAgger's
    mixture); rows are still labelled with the expert's action. `only_won`: keep only episodes
    that reach the goal (expert runs; ignored with a policy, whose failures are the point).
    episodes: a list to append the played `Episode`s to, in games order (won, steps, env failures:
    what the rows alone do not say). batch_size: live episodes at once (default 8 per worker; a
    policy that keeps episodes holds a cache row for each).
    """
    from singleturn.harness.rollout import run_episodes  # ALFWorld: only for play, not to read states

    rng = random.Random(seed)
    rows: dict[int, list] = {}
    fmt = PromptFormat(prompt, history_window, system_prompt, list_admissible)  # the policy's prompt format

    def on_state(state, episode_index):
        rows.setdefault(episode_index, []).append({k: state[k] for k in STATE_KEYS})

    def act(states):
        if policy is None:
            return [s["expert_action"] for s in states]
        actions = policy_actions(policy, states, fmt)
        return [s["expert_action"] if rng.random() < beta else a for s, a in zip(states, actions)]

    games = list(games)
    progress = Progress(f"[states] {'expert' if policy is None else 'policy'} episodes played", len(games))
    played = run_episodes(
        games,
        act,
        max_steps=max_steps,
        num_workers=num_workers,
        batch_size=batch_size,
        expert=expert,
        on_state=on_state,
        stop_without_expert=True,
        on_episode=lambda i, ep: progress.update(),
    )
    n = _write_rows(out_jsonl, played, rows, only_won=policy is None and only_won)
    if episodes is not None:
        episodes.extend(played)
    return n


def _write_rows(out_jsonl, played: list, rows: dict[int, list], only_won: bool) -> int:
    """Write the rows of the kept episodes (no env failure; won, if `only_won`); the row count."""
    out_jsonl = Path(out_jsonl)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out_jsonl, "w") as f:
        for i, ep in enumerate(played):  # games order, steps in order: the file is deterministic
            if ep.failed or (only_won and not ep.won):
                continue
            for row in rows.get(i, []):
                f.write(json.dumps(row) + "\n")
                n += 1
    return n


REQUIRED_KEYS = ("admissible", "expert_action", "observation", "goal")


def read_states(path) -> list[dict]:
    """Load a states.jsonl file (blank lines skipped); a row missing a required key, a line that is
    not JSON, or a file without states is an error naming the file and line."""
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON object ({e})") from None
            missing = sorted(set(REQUIRED_KEYS) - row.keys())
            if missing:
                raise ValueError(f"{path}:{line_no}: state is missing keys {missing}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no states")
    return rows
