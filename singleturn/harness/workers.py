"""A pool of env worker processes with a batched reset/step API, timeouts and restarts.

TextWorld is slow to reset and not thread-safe, so envs live in worker processes; an episode runs
in a *slot* (slot s lives in worker s % num_workers). A worker that raises, dies or misses its
deadline is killed and restarted, and each slot it held gets `StepResult(failed=True, error=...)`.
Workers die with the process that started them and never hold the run directory's lock.
Details: docs/pieces.md (harness/).

    with EnvPool(games, num_workers=2, expert="handcoded") as pool:
        first = pool.reset([0, 1, 2])            # slots 0..2 play games[0], games[1], games[2]
        nxt = pool.step({0: "go to cabinet 1", 2: first[2].expert_action})   # slot -> command
        pool.reset([5], slots=[1])               # refill slot 1 with games[5]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from singleturn.harness.env import AlfredGame, StepResult
from singleturn.harness.games import expert_episode_seed
from singleturn.harness.parent_death import exit_when_parent_dies


def _worker_main(conn, expert: str, patch_expert: bool, parent: int) -> None:
    exit_when_parent_dies(signal.SIGKILL, parent=parent)  # first: an orphan must not live on
    games: dict[int, AlfredGame] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        op, items = msg
        out = []
        for item in items:
            slot = item[0]
            try:
                if op == "reset":
                    _, path, seed = item
                    if slot not in games:
                        games[slot] = AlfredGame(expert, patch_expert=patch_expert)
                    games[slot].load(path)
                    res = games[slot].reset(seed=seed)
                else:
                    _, command = item
                    if slot not in games:
                        raise RuntimeError("no live env in this slot (its worker was restarted)")
                    res = games[slot].step(command)
            except Exception as e:  # the env raised: this episode is an env failure
                games.pop(slot, None)
                res = _failure(f"{type(e).__name__}: {e}")
            out.append((slot, res))
        conn.send(out)


def _failure(error: str, game: str = "") -> StepResult:
    return StepResult(
        observation="", admissible=[], won=False, expert_action=None, game=game, failed=True, error=error
    )


class _Worker:
    def __init__(self, ctx, expert: str, patch_expert: bool):
        self.conn, child = ctx.Pipe()
        args = (child, expert, patch_expert, os.getpid())
        self.proc = ctx.Process(target=_worker_main, args=args, daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)
        self.conn.close()


class EnvPool:
    """Batched ALFWorld envs in worker processes.

    games: game file paths (indexed by `reset`); num_workers: processes; expert: "handcoded" or
    "planner" (the label in `StepResult.expert_action`); step_timeout: seconds allowed per env per
    call (a reset counts `reset_factor` steps: loading runs the PDDL translation, and the planner
    plans); start_method: multiprocessing start method, default "fork" where available (0.4 s to
    start two workers, vs 6 s for "spawn", which re-imports the parent's main module; workers never
    touch torch or CUDA, as with torch DataLoader workers).
    """

    def __init__(
        self,
        games,
        num_workers: int = 1,
        *,
        expert: str = "handcoded",
        step_timeout: float = 60.0,
        reset_factor: float = 3.0,
        patch_expert: bool = True,
        start_method: str | None = None,
    ):
        self.games = [str(Path(g)) for g in games]
        self.num_workers = max(1, int(num_workers))
        self.expert = expert
        self.step_timeout = step_timeout
        self.reset_factor = reset_factor
        self.patch_expert = patch_expert
        if start_method is None:
            start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(start_method)
        self._workers = [self._spawn() for _ in range(self.num_workers)]
        self._slot_game: dict[int, str] = {}
        self.restarts = 0
        self.failures: list[dict] = []  # {slot, game, error} for every env failure

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.expert, self.patch_expert)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def worker_of(self, slot: int) -> int:
        return slot % self.num_workers

    # ------------------------------------------------------------------ batched API
    def reset(self, game_indices, slots=None, seeds=None) -> list[StepResult]:
        """Start episodes: slot `slots[i]` (default i) plays `games[game_indices[i]]`.

        seeds: per-episode seeds for the handcoded expert's random choices (default: a stable
        hash of the game path, see `games.expert_episode_seed`). Returns one result per request.
        """
        slots = list(range(len(game_indices))) if slots is None else list(slots)
        paths = [self.games[i] for i in game_indices]
        seeds = [expert_episode_seed(p) for p in paths] if seeds is None else list(seeds)
        for s, p in zip(slots, paths):
            self._slot_game[s] = p
        items = [(s, p, seed) for s, p, seed in zip(slots, paths, seeds)]
        out = self._call("reset", items, self.step_timeout * self.reset_factor)
        return [out[s] for s in slots]

    def step(self, actions) -> dict[int, StepResult] | list[StepResult]:
        """Step live slots: `actions` is {slot: command} (returns {slot: result}) or a list
        (slot i gets actions[i]; returns a list)."""
        as_list = not isinstance(actions, dict)
        mapping = dict(enumerate(actions)) if as_list else dict(actions)
        out = self._call("step", list(mapping.items()), self.step_timeout)
        return [out[s] for s in range(len(mapping))] if as_list else out

    def _call(self, op: str, items: list, per_env_timeout: float) -> dict[int, StepResult]:
        by_worker: dict[int, list] = {}
        for item in items:
            by_worker.setdefault(self.worker_of(item[0]), []).append(item)
        results: dict[int, StepResult] = {}
        sent = {}
        for w, part in by_worker.items():
            try:
                self._workers[w].conn.send((op, part))
                sent[w] = part
            except (BrokenPipeError, OSError) as e:
                self._fail_worker(w, part, results, f"worker died before {op}: {e!r}")
        start = time.monotonic()
        for w, part in sent.items():
            deadline = start + per_env_timeout * len(part)
            conn = self._workers[w].conn
            try:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    self._fail_worker(
                        w, part, results, f"{op} timed out after {per_env_timeout * len(part):.0f}s"
                    )
                    continue
                for slot, res in conn.recv():
                    if res.failed:
                        res.game = self._slot_game.get(slot, "")
                        self.failures.append({"slot": slot, "game": res.game, "error": res.error})
                    results[slot] = res
            except (EOFError, OSError) as e:
                self._fail_worker(w, part, results, f"worker died during {op}: {e!r}")
        return results

    def _fail_worker(self, w: int, part: list, results: dict, error: str) -> None:
        """Kill and restart worker w; every env in `part` (and every slot it held) failed."""
        self._workers[w].kill()
        self._workers[w] = self._spawn()
        self.restarts += 1
        for item in part:
            slot = item[0]
            game = self._slot_game.get(slot, "")
            results[slot] = _failure(error, game)
            self.failures.append({"slot": slot, "game": game, "error": error})

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in self._workers:
            w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"EnvPool(games={len(self.games)}, workers={self.num_workers}, expert={self.expert!r}, pid={os.getpid()})"
