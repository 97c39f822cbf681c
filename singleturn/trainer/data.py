"""Expert states -> token ids, a deterministic step-indexed sampler, and packing into batches.

The states file is the harness's JSONL (`harness.collect_states`): one object per expert step with
`{game, task_type, step, goal, history, observation, admissible, expert_action}`. Each state's prompt
is `harness.render_prompt(state, history_window=K)` through the checkpoint's chat template
(`model.policy.encode_prompt`: the one prompt -> ids function and its length policy); the SFT target
is the expert action followed by the tokenizer's end-of-turn id (`<|eot_id|>` for LLaMA-3).

Sampling is a pure function of the global step (a fresh seeded permutation per epoch over the
concatenated stream), so the data position of a resumed run is just its step: no iterator state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from singleturn.harness import render_prompt
from singleturn.harness.prompts import PromptFormat
from singleturn.model.policy import encode_prompt, prompt_budget

PACK_PAD = 0
"""Right padding of packed training sequences: any in-vocabulary id works (causal attention keeps it
invisible and it is never a target); the tokenizer's pad id may lie outside the embedding."""


@dataclass(frozen=True)
class Example:
    """One single-turn problem: the rendered prompt and the expert completion."""

    prompt_ids: list[int]
    """Chat-template ids ending with the assistant header."""
    target_ids: list[int]
    """Expert action ids + eot (the SFT target)."""
    state: dict
    """The raw state row (admissible, expert_action, task_type for rewards and stats)."""


def prompt_format(data_cfg):
    """The run's `harness.PromptFormat` (data.prompt, history_window, system_prompt, list_admissible),
    shared by training, rollouts and evaluation."""
    return PromptFormat(
        data_cfg.prompt, data_cfg.history_window, data_cfg.system_prompt, data_cfg.list_admissible
    )


def prompt_messages(state: dict, history_window: int, system_prompt: bool = True) -> list[dict]:
    """A state's chat messages in the window format (harness.render_prompt), shared with evaluation."""
    return render_prompt(state, history_window, system_prompt)


def build_examples(
    states: list[dict], tokenizer, *, history_window: int, max_seq_len: int, system_prompt: bool = True
) -> tuple[list[Example], int]:
    """Tokenize states -> (examples whose prompt + target fit in max_seq_len, number dropped).

    A state whose prompt would be cut (`encode_prompt`'s length policy) is dropped and counted.
    """
    out, dropped = [], 0
    for state in states:
        target = tokenizer.encode(state["expert_action"]) + [tokenizer.eot_id]
        messages = prompt_messages(state, history_window, system_prompt)
        prompt, truncated = encode_prompt(tokenizer, messages, prompt_budget(max_seq_len, len(target)))
        if truncated:
            dropped += 1
            continue
        out.append(Example(prompt, target, state))
    return out, dropped


def batch_indices(
    step: int, batch_size: int, num_examples: int, seed: int, blocks: tuple[int, ...] | None = None
) -> list[int]:
    """Global batch of `step` (0-based): positions [step*B, (step+1)*B) of the epoch-permuted stream.

    Epoch e uses permutation(seed, e), so the batch is a pure function of (step, B, n, seed).
    blocks: the examples are consecutive blocks of these lengths (the states of each expert episode):
    the epoch permutes the blocks and keeps each block's examples together and in order, so a batch
    holds whole stretches of episodes (whose prompts extend one another in the episode format).
    """
    out = []
    start = step * batch_size
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, num_examples)
        order = (
            _permutation(seed, epoch, num_examples) if blocks is None else _block_order(seed, epoch, blocks)
        )
        out.append(int(order[i]))
    return out


def _block_order(seed: int, epoch: int, blocks: tuple[int, ...]) -> np.ndarray:
    key = (seed, epoch, blocks)
    if key not in _PERM_CACHE:
        if sum(blocks) <= 0 or min(blocks) < 1:
            raise ValueError("blocks must be positive lengths")
        starts = np.concatenate([[0], np.cumsum(blocks)[:-1]])
        perm = np.random.default_rng([seed, epoch]).permutation(len(blocks))
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.concatenate([np.arange(starts[b], starts[b] + blocks[b]) for b in perm])
    return _PERM_CACHE[key]


_PERM_CACHE: dict[tuple, np.ndarray] = {}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERM_CACHE[key]


def rank_slice(items: list, rank: int, world_size: int) -> list:
    """This rank's contiguous share of a global batch (the caller checked divisibility)."""
    per = len(items) // world_size
    return items[rank * per : (rank + 1) * per]


def chunks(items: list, size: int) -> list[list]:
    """Consecutive micro-batches of at most `size`."""
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass
class PackedBatch:
    """Right-padded prompt+completion sequences and the flat indices of the completion tokens.

    The hidden state at (rows[n], cols[n]) predicts targets[n]; seq[n] is the sequence of token n.
    """

    tokens: torch.Tensor  # (B, T) int64
    rows: torch.Tensor  # (N,) int64
    cols: torch.Tensor  # (N,) int64
    targets: torch.Tensor  # (N,) int64
    seq: torch.Tensor  # (N,) int64

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())


def pack_completions(
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    pad_id: int = PACK_PAD,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Pack prompt+completion pairs (right padding: causal attention needs no mask)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts vs {len(completions)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    T = max(lengths)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.int64)
    rows, cols, targets, seq = [], [], [], []
    for b, (p, c) in enumerate(zip(prompts, completions)):
        if not p:
            raise ValueError(f"sequence {b} has an empty prompt")
        ids = p + c
        tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        # Position t predicts token t+1: completion token j sits at len(p)+j, predicted from len(p)+j-1.
        n = len(c)
        rows.extend([b] * n)
        cols.extend(range(len(p) - 1, len(p) - 1 + n))
        targets.extend(c)
        seq.extend([b] * n)

    def t(x):
        return torch.tensor(x, dtype=torch.int64, device=device)

    return PackedBatch(tokens.to(device), t(rows), t(cols), t(targets), t(seq))
