"""Evaluation over live episodes kept as growing token sequences (`EpisodeCache`).

`EpisodePolicy(model, tokenizer, decoding=...)` is an evaluation policy for `harness.evaluate` that
acts on the harness's states directly (`act_states`), so it knows which episode each state
continues: an episode gets a cache row on its first state and gives it back when it stops
appearing. Each turn the row's ids are brought to the turn's committed stream
(`harness.render_episode` + `model.episode_tokens.split_turn`): the longest common prefix of what the
row holds and the stream is kept, the rest computed; then this turn's material (the template's end
of message and assistant header, and the admissible list when the prompt keeps one) goes on top, and
the admissible commands (`encode(action) + end of turn`, as SFT targets are written) are decoded:

- `decoding="rank"`: every command's total log-prob, as a token trie on top of the cache (dropped).
- `decoding="greedy"`: trie-constrained greedy decoding, one batched forward per branching point of
  the trie (a token the trie forces is appended with the next choice, not decoded on its own). The
  tokens it appends stay in the row: when the next turn's stream writes the action the same way (the
  template keeps the assistant's turn verbatim, and no per-turn list sits before it), they are not
  computed again.

- `decoding="sample"`: free sampled decoding (a rollout: `sampling` holds temperature, top_p, top_k,
  max_new_tokens), drawn as `generate` draws for the same batch of whole prompts (`EpisodeCache.sample`);
  call c is seeded `seed + 7919 c` (`trainer.rollout.SamplingPolicy`'s rule). `act_states` returns the
  response texts, and `last` the call's (prompt ids, `Completion`) pairs: the ids the response was
  conditioned on, exactly, and the sampled ids and log-probs, for the RL losses.

All live episodes advance in one batched forward per step. Deterministic; the same actions as the
per-state path on the whole prompt (`ModelPolicy`, ranked or constrained greedy) up to batched-matmul
rounding on near-ties (exact in float64: tests/harness/test_episode_policy.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from singleturn.model.completion import Completion, stop_ids
from singleturn.model.episode_cache import EpisodeCache
from singleturn.model.episode_tokens import extend_committed, split_turn

__all__ = ["DECODINGS", "EpisodePolicy"]

DECODINGS = ("rank", "greedy", "sample")


class EpisodePolicy:
    name = "EpisodePolicy"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        decoding: str = "rank",
        max_episodes: int = 64,
        max_len: int = 4096,
        list_admissible: bool = True,
        system_prompt: bool = False,
        dtype: torch.dtype | None = None,
        sampling: dict | None = None,
        seed: int = 0,
    ):
        if decoding not in DECODINGS:
            raise ValueError(f"EpisodePolicy decodes by one of {DECODINGS}, got {decoding!r}")
        if (decoding == "sample") != (sampling is not None):
            raise ValueError("EpisodePolicy: decoding='sample' takes `sampling` (and only it does)")
        self.sampling, self.seed = dict(sampling or {}), seed
        self.decisions = self.response_tokens = self.truncated = (
            0  # SamplingPolicy's counts (never truncates)
        )
        self.last: list[tuple[list[int], Completion]] = []
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.list_admissible, self.system_prompt = list_admissible, system_prompt
        self.cache = EpisodeCache(model, max_episodes, max_len, dtype=dtype)
        self.rows: dict[str, int] = {}  # episode key -> cache row
        self.committed: dict[int, list[int]] = {}  # row -> its committed stream (append-only)
        self.held: dict[int, list[int]] = {}  # row -> the ids its cache row holds now
        self.free = list(reversed(range(max_episodes)))
        self.calls = 0

    def __call__(self, messages, admissible=None):
        raise TypeError("EpisodePolicy acts on states (act_states), not on rendered messages")

    def close(self) -> None:
        self.cache.close()

    def _row(self, state: dict, key: str) -> int:
        row = self.rows.get(key)
        if row is not None and state["step"] == 0:  # the same game started over
            self.free.append(self.rows.pop(key))
            row = None
        if row is None:
            if not self.free:
                raise ValueError(f"more than {self.cache.rows} live episodes: raise max_episodes")
            row = self.rows[key] = self.free.pop()
            self.cache.reset([row])
            self.committed[row], self.held[row] = [], []
        return row

    def _sync(self, row: int, committed: list[int]) -> list[int]:
        """The ids to append so that row holds `committed`: what it holds past their common prefix is dropped."""
        extend_committed(self.committed[row], committed)  # raises unless the stream only grew
        self.committed[row] = committed
        held, p = self.held[row], 0
        n = min(len(held), len(committed))
        while p < n and held[p] == committed[p]:
            p += 1
        p = min(p, len(committed) - 1)  # recompute at least the last token: it predicts the next one
        if p < len(held):
            if p > 0:
                self.cache.truncate(row, p)
            else:
                self.cache.reset([row])
        self.held[row] = committed[:p]
        return committed[p:]

    def _append(self, new: Sequence[Sequence[int]]) -> None:
        self.cache.append(new)
        for r, t in enumerate(new):
            if t:
                self.held[r] = self.held[r] + list(t)

    def _sample(self, rows: list[int], turn: list[list[int]]) -> list[str]:
        seed = (self.seed + 7919 * (self.calls - 1)) & 0x7FFF_FFFF
        prompts = [self.held[r] + t for r, t in zip(rows, turn)]
        out = self.cache.sample(rows, turn, stop_ids=stop_ids(self.tokenizer), seed=seed, **self.sampling)
        self.last = []
        for r, p, t, (ids, logp) in zip(rows, prompts, turn, out):
            self.held[r] = self.held[r] + t + ids[:-1]  # the last id is not appended (EpisodeCache.sample)
            self.last.append((p, Completion(ids, logp, self.tokenizer.decode(ids))))
        self.decisions += len(rows)
        self.response_tokens += sum(len(c.tokens) for _, c in self.last)
        return [c.text for _, c in self.last]

    @torch.no_grad()
    def act_states(self, states: Sequence[dict], keys: Sequence | None = None) -> list[str]:
        """One admissible command per state (rank, greedy) or one response text (sample); states of
        distinct episodes. keys[i] names state i's episode (default: its game; a rollout group plays
        one game several times at once)."""
        from singleturn.harness.prompts import render_episode  # torch-free; the harness imports models lazily

        keys = [str(s["game"]) for s in states] if keys is None else [str(k) for k in keys]
        live = set(keys)
        if len(live) != len(states):
            raise ValueError("act_states: two states of the same episode in one call")
        for key in [k for k in self.rows if k not in live]:  # episodes that ended: their rows are free
            self.free.append(self.rows.pop(key))
        n = self.cache.rows
        new, turn, cands = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        rows = []
        eot = self.tokenizer.eot_id
        for s, key in zip(states, keys):
            if not s["admissible"] and self.decoding != "sample":
                raise ValueError(f"state {s['game']} step {s['step']}: no admissible action to decode")
            row = self._row(s, key)
            rows.append(row)
            messages, suffix = render_episode(
                s, list_admissible=self.list_admissible, system_prompt=self.system_prompt
            )
            committed, turn[row] = split_turn(self.tokenizer, messages, suffix)
            new[row] = self._sync(row, committed)
            if self.decoding != "sample":
                cands[row] = [self.tokenizer.encode(a) + [eot] for a in s["admissible"]]
        self.calls += 1
        self._append(new)
        if self.decoding == "sample":
            return self._sample(rows, [turn[r] for r in rows])
        if self.decoding == "greedy":
            picks, appended = self.cache.greedy(cands, prefix=turn)
            for r in rows:
                self.held[r] = self.held[r] + appended[r]
            return [s["admissible"][picks[r]] for s, r in zip(states, rows)]
        scores = self.cache.score(cands, suffix=turn)
        # Ties (exact in fp64 only for identical token sequences) go to the first listed command.
        return [
            s["admissible"][max(range(len(s["admissible"])), key=scores[r].__getitem__)]
            for s, r in zip(states, rows)
        ]
