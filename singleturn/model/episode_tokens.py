"""Token ids of an append-only conversation turn, split where the per-turn material starts.

`split_turn(tokenizer, messages, turn_suffix)` -> (committed, turn): the ids of the whole conversation
up to the end of the last (user) message's content, and the ids that follow for this turn only: the
turn_suffix, the template's end of that message and the generation prompt. Appending committed[len of
last turn's committed:] to an `EpisodeCache` row and scoring candidates with suffix=turn computes the
same sequence as `tokenizer.apply_chat_template(messages with the suffix in the last content)` + the
candidate, and the committed stream only grows from turn to turn (`extend_committed` checks it).
Tokenization boundaries are checked, never assumed: a template or tokenizer that would merge tokens
across the split raises, naming it, instead of silently shifting ids.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TurnSplitError", "extend_committed", "split_turn"]


class TurnSplitError(ValueError):
    """The conversation cannot be split into committed + per-turn ids consistently."""


def split_turn(tokenizer, messages: Sequence[dict], turn_suffix: str) -> tuple[list[int], list[int]]:
    """(committed ids, this turn's ids) of `messages` whose last message is the current user turn."""
    if not messages or messages[-1]["role"] != "user":
        raise TurnSplitError("the conversation must end with the current user message")
    last = messages[-1]["content"]
    full_messages = [*messages[:-1], {**messages[-1], "content": last + turn_suffix}]
    text = tokenizer.render_chat(full_messages, add_generation_prompt=True)
    plain = tokenizer.render_chat(messages, add_generation_prompt=True)
    cut = plain.rfind(last) + len(last)  # the end of the last message's content
    if plain.rfind(last) < 0 or text != plain[:cut] + turn_suffix + plain[cut:]:
        raise TurnSplitError("the chat template does not write the last message's content verbatim")
    committed, turn = tokenizer.encode(plain[:cut]), tokenizer.encode(text[cut:])
    if committed + turn != tokenizer.encode(text):
        raise TurnSplitError(
            f"tokenizing at the end of the last message merges tokens across the split ({plain[cut - 20 : cut]!r} | "
            f"{text[cut : cut + 20]!r}): this tokenizer/template needs another split point"
        )
    return committed, turn


def extend_committed(previous: Sequence[int], committed: Sequence[int]) -> list[int]:
    """The ids a turn adds to an episode's committed stream; raises unless `previous` is its prefix."""
    n = len(previous)
    if list(committed[:n]) != list(previous):
        raise TurnSplitError(f"the committed stream changed within its first {n} ids: not append-only")
    return list(committed[n:])
