"""Run many multi-turn episodes over an `EnvPool`: the loop shared by `collect_states` and `evaluate`.

`run_episodes(games, act, ...)` keeps up to `batch_size` episodes live (finished slots are refilled
with the next game), asks `act` for one command per live state in a single batched call, and steps
all of them at once. The state handed to `act` (and to `on_state`) is the states.jsonl row:
{game, task_type, step, goal, history: [[observation, action], ...], observation, admissible,
expert_action}, where expert_action is the expert's choice in this very env state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from singleturn.harness.env import INVALID_COMMAND
from singleturn.harness.workers import EnvPool


@dataclass
class Episode:
    """One finished episode."""

    game: str
    task_type: str
    won: bool = False
    steps: int = 0
    invalid: int = 0  # steps whose policy output parsed to no admissible action
    matches: int = 0  # steps whose action equalled the expert's
    labeled: int = 0  # steps where the expert offered an action
    failed: bool = False  # env failure (crash, hang, exception)
    error: str = ""
    actions: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _state(res, game: str, step: int, history: list) -> dict:
    return {
        "game": game,
        "task_type": res.task_type,
        "step": step,
        "goal": res.goal,
        "history": [list(h) for h in history],
        "observation": res.observation,
        "admissible": res.admissible,
        "expert_action": res.expert_action,
    }


def run_episodes(
    games,
    act,
    *,
    max_steps: int = 50,
    num_workers: int = 1,
    expert: str = "handcoded",
    batch_size: int | None = None,
    on_state=None,
    stop_without_expert: bool = False,
    step_timeout: float = 60.0,
    pool: EnvPool | None = None,
    on_episode=None,
) -> list[Episode]:
    """Play every game once; returns episodes in `games` order.

    act: list[state] -> list[str | None], one command per state (None: the output named no
    admissible action; the env then gets a no-op and the step counts as invalid).
    on_state: called as on_state(state, episode_index) before acting (e.g. to keep states).
    stop_without_expert: end an episode (as lost) when the expert has no action to offer.
    batch_size: live episodes at once (default 8 per worker).
    on_episode: called as on_episode(episode_index, episode) as each episode ends (e.g. to log it).
    """
    _check_at_least_one(max_steps=max_steps, num_workers=num_workers, batch_size=batch_size)
    games = [str(g) for g in games]
    batch_size = batch_size or 8 * num_workers
    own_pool = pool is None
    if pool is not None and pool.games != games:
        raise ValueError("pool was built over a different games list (reset indexes pool.games)")
    pool = pool or EnvPool(games, num_workers, expert=expert, step_timeout=step_timeout)
    episodes = [Episode(game=g, task_type="") for g in games]
    try:
        live: dict[int, dict] = {}  # slot -> {"index", "res", "history"}
        queue = list(range(len(games)))
        _refill(pool, queue, live, episodes, range(min(batch_size, len(games))), on_episode)
        while live:
            slots = sorted(live)
            states = [
                _state(live[s]["res"], games[live[s]["index"]], len(live[s]["history"]), live[s]["history"])
                for s in slots
            ]
            if on_state is not None:
                for s, st in zip(slots, states):
                    if st["expert_action"] is not None or not stop_without_expert:
                        on_state(st, live[s]["index"])
            to_step, finished = _record_commands(
                episodes, live, slots, states, act(states), stop_without_expert
            )
            results = pool.step(to_step) if to_step else {}
            finished += _record_steps(episodes, live, results, to_step, max_steps)
            for s in finished:
                e = live.pop(s)
                if on_episode is not None:
                    on_episode(e["index"], episodes[e["index"]])
            _refill(pool, queue, live, episodes, finished, on_episode)
    finally:
        if own_pool:
            pool.close()
    return episodes


def _check_at_least_one(**counts) -> None:
    """0 steps or 0 workers would report unplayed episodes as lost ones (None: the default)."""
    bad = {k: v for k, v in counts.items() if v is not None and v < 1}
    if bad:
        raise ValueError(", ".join(f"{k} must be at least 1, got {v}" for k, v in bad.items()))


def _refill(pool: EnvPool, queue: list, live: dict, episodes: list, free_slots, on_episode) -> None:
    """Start the next queued games in `free_slots`; a game whose reset fails ends at once (an env
    failure) and its slot takes the next game."""
    slots = [s for s in free_slots][: len(queue)]
    if not slots:
        return
    indices = [queue.pop(0) for _ in slots]
    for slot, i, res in zip(slots, indices, pool.reset(indices, slots=slots)):
        episodes[i].task_type = res.task_type
        if res.failed:
            episodes[i].failed, episodes[i].error = True, res.error
            if on_episode is not None:
                on_episode(i, episodes[i])
            _refill(pool, queue, live, episodes, [slot], on_episode)
            continue
        live[slot] = {"index": i, "res": res, "history": []}


def _record_commands(episodes, live, slots, states, commands, stop_without_expert) -> tuple[dict, list]:
    """Count each live slot's command against the expert's; ({slot: command to send}, [slots that end
    here because the expert has nothing to offer])."""
    to_step, finished = {}, []
    for s, st, cmd in zip(slots, states, commands):
        ep = episodes[live[s]["index"]]
        if stop_without_expert and st["expert_action"] is None:
            finished.append(s)
            continue
        if st["expert_action"] is not None:
            ep.labeled += 1
            ep.matches += int(cmd == st["expert_action"])
        if cmd is None:
            ep.invalid += 1
        ep.actions.append(cmd)
        to_step[s] = cmd if cmd is not None else INVALID_COMMAND
    return to_step, finished


def _record_steps(episodes, live, results, to_step, max_steps) -> list:
    """Apply the env's step results to the live slots; the slots whose episode ended (failed, won,
    or out of steps), in result order."""
    finished = []
    for s, res in results.items():
        e = live[s]
        ep = episodes[e["index"]]
        ep.steps += 1
        if res.failed:
            ep.failed, ep.error = True, res.error
            finished.append(s)
            continue
        e["history"].append([e["res"].observation, to_step[s]])
        e["res"] = res
        if res.won:
            ep.won = True
            finished.append(s)
        elif ep.steps >= max_steps:
            finished.append(s)
    return finished
