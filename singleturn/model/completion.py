"""What every policy reads and decodes into: the one prompt-length rule (`prompt_budget`,
`response_room`, `encode_prompt`), the ids that end a response (`stop_ids`) and a decoded response
(`Completion`). Shared by the training data (trainer/data.py), the rollouts and the act path
(model/episode_policy.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def prompt_budget(max_seq_len: int, response_tokens: int) -> int:
    """The one prompt-length rule: a prompt keeps at most `max_seq_len - response_tokens` ids, where
    response_tokens is what follows it in the same sequence: the SFT target (action + end of turn), the
    longest admissible command + end of turn for ranked or trie-constrained decoding
    (`response_room`), else max_new_tokens."""
    if not 0 < response_tokens < max_seq_len:
        raise ValueError(
            f"a response of {response_tokens} tokens leaves no room in max_seq_len={max_seq_len}"
        )
    return max_seq_len - response_tokens


def response_room(
    tokenizer, admissible: Sequence[str], *, decoding: str, constrained: bool, max_new_tokens: int
) -> int:
    """Tokens a policy may add after a state's prompt: ranked and constrained decoding produce an
    admissible command + end of turn (the longest one bounds it), free decoding max_new_tokens."""
    if decoding == "rank" or (decoding == "greedy" and constrained):
        return max(len(tokenizer.encode(a)) + 1 for a in admissible)
    return max_new_tokens


def encode_prompt(tokenizer, messages: Sequence[dict], max_tokens: int) -> tuple[list[int], bool]:
    """(ids, truncated): the chat-template ids of `messages` + the generation prompt, cut to the last
    `max_tokens` ids when longer (the window format's length policy)."""
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    if len(ids) > max_tokens:
        return ids[-max_tokens:], True
    return ids, False


def stop_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end a response: the end-of-turn id and the tokenizer's other end-of-sequence ids."""
    ids = {tokenizer.eot_id}
    ids.update(getattr(tokenizer, "eos_ids", ()) or ())
    return tuple(sorted(ids))


@dataclass
class Completion:
    """One generated response: ids up to and including the stop token, their log-probs, the text."""

    tokens: list[int]
    logprobs: torch.Tensor  # (len(tokens),) fp32 cpu: sampled-token log-probs (0 for greedy)
    text: str
