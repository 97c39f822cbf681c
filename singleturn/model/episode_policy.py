"""Ranked decoding over live episodes kept as growing token sequences (`EpisodeCache`).

`EpisodeRankPolicy(model, tokenizer)` is an evaluation policy for `harness.evaluate` that acts on the
harness's states directly (`act_states`), so it can know which episode each state continues: an
episode gets a cache row on its first state and gives it back when it stops appearing; each turn
appends only what the turn commits (`harness.render_episode` + `model.episode_tokens.split_turn`) and
ranks the admissible commands (`encode(action) + end of turn`, as SFT targets are written) on top of
the cache, after this turn's admissible list as a per-turn suffix (or without it). All live episodes
advance in one batched forward per turn. Deterministic; the same actions as playing each episode
alone up to batched-matmul rounding on near-ties (exact in float64, tests/model/test_episode_policy.py).

Its prompt is the append-only conversation, not the window-and-memory prompt the trainer's models
are trained on today (docs/episode-engine.md): use it for models that know that format.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from singleturn.model.episode_cache import EpisodeCache
from singleturn.model.episode_tokens import extend_committed, split_turn

__all__ = ["EpisodeRankPolicy"]


class EpisodeRankPolicy:
    name = "EpisodeRankPolicy"

    def __init__(self, model, tokenizer, *, max_episodes: int = 64, max_len: int = 4096,
                 list_admissible: bool = True, system_prompt: bool = False, dtype: torch.dtype | None = None):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.list_admissible, self.system_prompt = list_admissible, system_prompt
        self.cache = EpisodeCache(model, max_episodes, max_len, dtype=dtype)
        self.rows: dict[str, int] = {}  # episode key -> cache row
        self.committed: dict[int, list[int]] = {}  # row -> its committed ids
        self.free = list(reversed(range(max_episodes)))
        self.calls = 0

    def __call__(self, messages, admissible=None):
        raise TypeError("EpisodeRankPolicy acts on states (act_states), not on rendered messages")

    def close(self) -> None:
        self.cache.close()

    def _row(self, state: dict) -> int:
        key = str(state["game"])
        row = self.rows.get(key)
        if row is not None and state["step"] == 0:  # the same game started over
            self.free.append(self.rows.pop(key))
            row = None
        if row is None:
            if not self.free:
                raise ValueError(f"more than {self.cache.rows} live episodes: raise max_episodes")
            row = self.rows[key] = self.free.pop()
            self.cache.reset([row])
            self.committed[row] = []
        return row

    @torch.no_grad()
    def act_states(self, states: Sequence[dict]) -> list[str]:
        """One admissible command per state (the highest total log-prob); states of distinct episodes."""
        from singleturn.harness.prompts import render_episode  # torch-free; the harness imports models lazily

        live = {str(s["game"]) for s in states}
        if len(live) != len(states):
            raise ValueError("act_states: two states of the same episode in one call")
        for key in [k for k in self.rows if k not in live]:  # episodes that ended: their rows are free
            self.free.append(self.rows.pop(key))
        n = self.cache.rows
        new, turn, cands = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        rows = []
        eot = self.tokenizer.eot_id
        for s in states:
            if not s["admissible"]:
                raise ValueError(f"state {s['game']} step {s['step']}: no admissible action to rank")
            row = self._row(s)
            rows.append(row)
            messages, suffix = render_episode(
                s, list_admissible=self.list_admissible, system_prompt=self.system_prompt
            )
            committed, turn[row] = split_turn(self.tokenizer, messages, suffix)
            new[row] = extend_committed(self.committed[row], committed)
            self.committed[row] = committed
            cands[row] = [self.tokenizer.encode(a) + [eot] for a in s["admissible"]]
        self.cache.append(new)
        scores = self.cache.score(cands, suffix=turn)
        self.calls += 1
        # Ties (exact in fp64 only for identical token sequences) go to the first listed command.
        return [
            s["admissible"][max(range(len(s["admissible"])), key=scores[r].__getitem__)]
            for s, r in zip(states, rows)
        ]
