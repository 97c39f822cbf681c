"""Expert episodes as single training rows (`data.prompt = "episode"`): each state's prompt computed once.

In the append-only episode format (`harness.render_episode`, the format `model.EpisodePolicy`
evaluates in) state t's prompt is the episode's committed ids up to its observation + this turn's ids
(the admissible list when kept, the end of the user message, the assistant header); state t+1's prompt
extends state t's prompt + its action. So an expert episode is one token tree (`model.masks.TreeItem`):
- a trunk: the committed stream, written once;
- where the scored turn [turn ids + action + eot] is exactly how the trunk continues (no per-turn
  suffix: the list left out), the targets sit on the trunk itself and nothing is repeated;
- otherwise (the list kept, or a template that writes the action differently from `encode(action) +
  eot`) a branch [turn ids + action + eot] written right after the trunk's committed_t, at RoPE
  positions len(committed_t) + j: under the tree mask it sees the trunk so far and itself, and no later
  trunk token sees it.
Each target is predicted from exactly the ids the per-state prompt would hold (tests/trainer/
test_episode_data.py: losses and gradients equal the per-state path's, fp32). The SFT loss is every
expert action of the episode; `seq` numbers the episode's states in step order.

`build_episode_examples` also returns the per-state `Example`s of the same format (prompt = committed_t +
turn_t, no re-encoding), which the GRPO stage rolls out from.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from singleturn.harness.prompts import render_episode
from singleturn.model.episode_tokens import TurnSplitError, extend_committed, split_turn
from singleturn.model.masks import TreeItem, build_tree_batch, pack_by_tokens
from singleturn.trainer.data import PACK_PAD, Example, PackedBatch

__all__ = ["EpisodeExample", "build_episode_examples", "episode_micro_batches", "episode_states", "shifted"]


@dataclass(frozen=True)
class EpisodeExample:
    """One expert episode as a token tree; item.seq[n] is the index of target n's state in `states`."""

    item: TreeItem
    states: list[dict]

    @property
    def num_tokens(self) -> int:
        return len(self.item.tokens)


def episode_states(states: list[dict]) -> list[list[dict]]:
    """The states grouped by episode (game), each in step order; raises unless steps are 0..n-1."""
    by_game: dict[str, list[dict]] = defaultdict(list)
    for s in states:
        by_game[str(s["game"])].append(s)
    out = []
    for game, rows in by_game.items():
        rows = sorted(rows, key=lambda s: s["step"])
        steps = [s["step"] for s in rows]
        if steps != list(range(len(rows))):
            raise ValueError(
                f"episode {game}: expert states must be steps 0..{len(rows) - 1}, got {steps[:8]}..."
            )
        out.append(rows)
    return out


def _episode(tokenizer, states: list[dict], *, list_admissible: bool, system_prompt: bool):
    """(TreeItem, per-state (prompt ids, target ids), longest position + 1) of one episode."""
    eot = tokenizer.eot_id
    splits, prev = [], []
    for s in states:
        messages, suffix = render_episode(s, list_admissible=list_admissible, system_prompt=system_prompt)
        committed, turn = split_turn(tokenizer, messages, suffix)
        extend_committed(prev, committed)  # raises unless the stream only grows
        splits.append((committed, turn))
        prev = committed
    item = TreeItem([], [], [], [], [], [])
    trunk: list[int] = []  # the trunk's ids so far (its RoPE positions are 0..len-1)
    pairs, longest = [], 0
    for t, (s, (committed, turn)) in enumerate(zip(states, splits)):
        if committed[: len(trunk)] != trunk:
            raise TurnSplitError(f"{s['game']} step {t}: the trunk is not a prefix of the committed ids")
        new = committed[len(trunk) :]
        item.tokens += new
        item.positions += range(len(trunk), len(trunk) + len(new))
        item.branch += [0] * len(new)
        trunk += new
        action = tokenizer.encode(s["expert_action"]) + [eot]
        scored = turn + action
        pairs.append((committed + turn, action))
        nxt = splits[t + 1][0] if t + 1 < len(states) else None
        on_trunk = nxt is None or nxt[len(trunk) : len(trunk) + len(scored)] == scored
        P = len(trunk)
        at = len(item.tokens)
        item.tokens += scored
        item.positions += range(P, P + len(scored))
        item.branch += [0 if on_trunk else t + 1] * len(scored)
        # action token j (slot at + len(turn) + j) is predicted by the slot before it
        item.src += range(at + len(turn) - 1, at + len(scored) - 1)
        item.targets += action
        item.seq += [t] * len(action)
        longest = max(longest, P + len(scored))
        if on_trunk:
            trunk += scored
    return item, pairs, longest


def build_episode_examples(
    states: list[dict], tokenizer, *, list_admissible: bool, system_prompt: bool, max_seq_len: int
) -> tuple[list[EpisodeExample], list[Example], int]:
    """(episodes, per-state examples, states dropped): one token tree per expert episode.

    An episode whose longest prompt + action would pass `max_seq_len` positions is dropped whole and
    its states counted (the caller reports the count), never cut.
    """
    episodes, examples, dropped = [], [], 0
    for rows in episode_states(states):
        item, pairs, longest = _episode(
            tokenizer, rows, list_admissible=list_admissible, system_prompt=system_prompt
        )
        if longest > max_seq_len:
            dropped += len(rows)
            continue
        episodes.append(EpisodeExample(item, rows))
        examples += [Example(p, a, s) for (p, a), s in zip(pairs, rows)]
    return episodes, examples, dropped


def shifted(item: TreeItem, offset: int) -> TreeItem:
    """A copy of `item` whose seq ids are moved by `offset` (several episodes in one micro-batch)."""
    return TreeItem(
        item.tokens, item.positions, item.branch, item.src, item.targets, [q + offset for q in item.seq]
    )


def _linear(item: TreeItem) -> bool:
    """One causal sequence: no branch, positions 0..n-1 (the episode format without a per-turn suffix)."""
    return not any(item.branch) and item.positions == list(range(len(item.tokens)))


def episode_micro_batches(episodes: list[EpisodeExample], *, max_tokens: int, row_len: int, device) -> list:
    """Micro-batches of this rank's episodes, seq numbering their states in order (episode by episode).

    Episodes that are one causal sequence each (no branches) go one per right-padded row without any
    mask (`trainer.data.PackedBatch`: causal attention, SDPA's fast path; rows of similar length
    together, at most max_tokens computed tokens per micro-batch). Otherwise token trees under the
    tree mask (`model.masks.build_tree_batch`), rows of at most row_len tokens.
    """
    items, offset = [], 0
    for ep in episodes:
        items.append(shifted(ep.item, offset))
        offset += len(ep.states)
    if not all(_linear(it) for it in items):
        return build_tree_batch(
            items, max_tokens=max_tokens, row_len=row_len, order="length", pad_id=PACK_PAD, device=device
        )
    plan = pack_by_tokens(
        [len(it.tokens) for it in items], max_tokens=max_tokens, items_per_row=1, order="length"
    )
    out = []
    for batch in plan:
        rows = [items[row[0]] for row in batch]
        T = max(len(it.tokens) for it in rows)
        tokens = torch.full((len(rows), T), PACK_PAD, dtype=torch.int64)
        r, c, tg, sq = [], [], [], []
        for b, it in enumerate(rows):
            tokens[b, : len(it.tokens)] = torch.as_tensor(it.tokens, dtype=torch.int64)
            r += [b] * len(it.src)
            c += it.src
            tg += it.targets
            sq += it.seq

        def t(x):
            return torch.tensor(x, dtype=torch.int64, device=device)

        out.append(PackedBatch(tokens.to(device), t(r), t(c), t(tg), t(sq)))
    return out
