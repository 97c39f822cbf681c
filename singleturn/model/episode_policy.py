"""The one act path: a policy that plays live episodes over an `EpisodeCache` (one KV-cache row per
episode), used by evaluation, the multi-turn rollouts, grpo-dagger's play and the bound's
teacher-forced agreement.

`EpisodePolicy(model, tokenizer, prompt=..., decoding=...)` acts on the harness's states directly
(`act_states`), so it knows which episode each state continues: an episode gets a cache row on its
first state and gives it back when it stops appearing. Each turn the state is written as ids in the
prompt format and the row is brought to them: the longest common prefix of what the row holds and
the turn's ids is kept, the rest computed.

- `prompt="episode"` (`harness.render_episode` + `model.episode_tokens.split_turn`): the episode is one
  append-only conversation (checked); this turn's material (the admissible list when the prompt keeps
  one, the template's end of message and assistant header) goes on top and is dropped after the turn,
  so a turn computes only the observation and action it adds. Longer than `max_len` is an error.
- `prompt="window"` (`harness.render_prompt`): each turn's prompt is written afresh (the last turns,
  the memory lines); what it shares with the last turn's from the start (the task) is kept, and a
  prompt that does not fit keeps its last ids (counted in `truncated`), as `encode_prompt` cuts it.

Decodings, of the admissible commands written `encode(action) + end of turn` as SFT targets are:
- `"rank"`: every command's total log-prob, as a token trie on top of the cache (dropped).
- `"greedy"`, `constrained=True`: trie-constrained greedy decoding, one batched forward per branching
  point of the trie; the ids it appends stay in the row (the next episode-format turn writes them the
  same way, so they are not computed again). `constrained=False`: free greedy, `max_new_tokens` at most.
- `"sample"`: free sampled decoding (a rollout: `sampling` holds temperature, top_p, top_k,
  max_new_tokens), drawn as `generate` draws for the same batch of whole prompts; call c is seeded
  `seed + 7919 c`. `last` holds the call's (prompt ids, `Completion`) pairs: the ids the response was
  conditioned on, exactly, and the sampled ids and log-probs, for the RL losses.

All live episodes advance in one batched forward per step. Deterministic decodings take the same
actions as the cache-free path on each whole prompt (`score_continuations`, `generate`) up to
batched-matmul rounding on near-ties (exact in float64: tests/harness/test_episode_policy.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from singleturn.model.completion import Completion, prompt_budget, response_room, stop_ids
from singleturn.model.episode_cache import EpisodeCache
from singleturn.model.episode_tokens import extend_committed, split_turn

__all__ = ["DECODINGS", "EpisodePolicy"]

DECODINGS = ("rank", "greedy", "sample")
PROMPTS = ("episode", "window")


class EpisodePolicy:
    name = "EpisodePolicy"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        prompt: str = "episode",
        decoding: str = "rank",
        constrained: bool = True,
        max_new_tokens: int = 24,
        max_episodes: int = 64,
        max_len: int = 4096,
        history_window: int = 3,
        list_admissible: bool = True,
        system_prompt: bool = False,
        dtype: torch.dtype | None = None,
        sampling: dict | None = None,
        seed: int = 0,
        trie_slots: int = 256,
    ):
        if decoding not in DECODINGS:
            raise ValueError(f"EpisodePolicy decodes by one of {DECODINGS}, got {decoding!r}")
        if prompt not in PROMPTS:
            raise ValueError(f"EpisodePolicy: prompt must be one of {PROMPTS}, got {prompt!r}")
        if (decoding == "sample") != (sampling is not None):
            raise ValueError("EpisodePolicy: decoding='sample' takes `sampling` (and only it does)")
        if decoding == "greedy" and not constrained:  # free greedy: sampling at temperature 0
            sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": max_new_tokens}
        self.sampling, self.seed = dict(sampling or {}), seed
        self.decisions = self.response_tokens = self.truncated = 0
        self.last: list[tuple[list[int], Completion]] = []
        self.model, self.tokenizer, self.decoding, self.prompt = model, tokenizer, decoding, prompt
        self.constrained = constrained
        self.history_window = history_window
        self.list_admissible, self.system_prompt = list_admissible, system_prompt
        # Ranking writes each state's candidate trie past the row's end: its nodes need slots (positions
        # stay within max_len); the other decodings append along one path.
        slack = trie_slots if decoding == "rank" else 0
        self.cache = EpisodeCache(model, max_episodes, max_len, dtype=dtype, trie_slots=slack)
        self.rows: dict[str, int] = {}  # episode key -> cache row
        self.committed: dict[int, list[int]] = {}  # row -> its committed stream (append-only)
        self.held: dict[int, list[int]] = {}  # row -> the ids its cache row holds now
        self.free = list(reversed(range(max_episodes)))
        self.calls = 0

    def __call__(self, messages, admissible=None):
        raise TypeError("EpisodePolicy acts on states (act_states), not on rendered messages")

    @property
    def free_text(self) -> bool:
        """Decodes free text (sampled, or greedy without the trie) rather than an admissible command."""
        return self.decoding == "sample" or (self.decoding == "greedy" and not self.constrained)

    def _turn_ids(self, state: dict) -> tuple[list[int], list[int]]:
        """(committed ids, this turn's ids) of `state` in the prompt format (module docstring)."""
        # torch-free; the harness imports models lazily
        from singleturn.harness.prompts import render_episode, render_prompt

        if self.prompt == "episode":
            messages, suffix = render_episode(
                state, list_admissible=self.list_admissible, system_prompt=self.system_prompt
            )
            return split_turn(self.tokenizer, messages, suffix)
        messages = render_prompt(state, self.history_window, self.system_prompt)
        ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        room = response_room(
            self.tokenizer,
            state["admissible"],
            decoding=self.decoding,
            constrained=self.constrained,
            max_new_tokens=self.sampling.get("max_new_tokens", 0),
        )
        budget = prompt_budget(self.cache.max_len, room)
        if len(ids) > budget:
            ids = ids[-budget:]
            self.truncated += 1
        return ids, []

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
        if self.prompt == "episode":
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
        """One admissible command per state (rank, constrained greedy) or one response text (free
        decodings); states of distinct episodes. keys[i] names state i's episode (default: its game;
        a rollout group plays one game several times at once)."""
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
            if not s["admissible"] and not self.free_text:
                raise ValueError(f"state {s['game']} step {s['step']}: no admissible action to decode")
            row = self._row(s, key)
            rows.append(row)
            committed, turn[row] = self._turn_ids(s)
            new[row] = self._sync(row, committed)
            if not self.free_text:
                cands[row] = [self.tokenizer.encode(a) + [eot] for a in s["admissible"]]
        self.calls += 1
        self._append(new)
        if self.free_text:
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
