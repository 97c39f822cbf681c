"""Admissible-constrained decoding: a token trie over the admissible commands, as a generate mask.

Each admissible command is tokenized exactly as the SFT target (`tokenizer.encode(action)` then
the tokenizer's end-of-turn id); `ActionTrie.allowed(prefix)` gives the ids that keep a partial response on some
command's path, and `allowed_tokens_fn` turns one trie per prompt into `model.generate`'s
`allowed_tokens(row, prefix)` hook. Every response decoded under it is an admissible command
followed by the end-of-turn token (a decoding choice, like a grammar: the model still ranks the
commands; it can no longer name a non-admissible one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["ActionTrie", "action_trie", "allowed_tokens_fn"]


class ActionTrie:
    """A prefix tree over token sequences; `allowed(prefix)` = the ids that may follow `prefix`."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("ActionTrie needs at least one sequence and no empty sequence")
        self.root: dict = {}
        for seq in sequences:
            node = self.root
            for t in seq:
                node = node.setdefault(int(t), {})
        self.max_len = max(len(s) for s in sequences)

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Ids continuing `prefix` along some sequence ([] past a sequence's end or off the tree)."""
        node = self.root
        for t in prefix:
            node = node.get(int(t))
            if node is None:
                return []
        return list(node)


def action_trie(tokenizer, actions: Sequence[str]) -> ActionTrie:
    """The trie of `encode(action) + [eot]` over the admissible actions (the SFT target format)."""
    return ActionTrie([tokenizer.encode(a) + [tokenizer.eot_id] for a in actions])


def allowed_tokens_fn(
    tries: Sequence[ActionTrie], num_samples: int = 1
) -> Callable[[int, list[int]], list[int]]:
    """generate's hook for prompt-major rows: row r decodes under tries[r // num_samples]."""

    def allowed(row: int, prefix: list[int]) -> list[int]:
        return tries[row // num_samples].allowed(prefix)

    return allowed
