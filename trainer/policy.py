"""The batched policy callable that `harness.evaluate` drives: list[messages] -> list[str].

`model_policy` wraps a model whose full weights are present (call it inside
`fsdp.summon_full_params`, or on an unsharded model) and decodes greedily with the same chat
template as training. Prompts longer than the model's context are left-truncated (counted in
`policy.truncated`); with a small history_window that does not happen in practice.

With `constrained=True` the policy asks `harness.evaluate` for each state's admissible actions
(`wants_admissible`) and decodes under a token trie over them (trainer/constrained.py): every output
is an admissible command, the greedy choice among them token by token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.constrained import action_trie, allowed_tokens_fn
from trainer.rollout import stop_ids


class ModelPolicy:
    """Greedy (temperature 0) batched policy over chat messages."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int,
        max_seq_len: int,
        max_batch: int = 64,
        constrained: bool = False,
    ):
        self.model = model
        self.constrained = constrained
        self.wants_admissible = constrained  # harness.evaluate then passes admissible=
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_seq_len = max_seq_len
        self.max_batch = max_batch
        self.truncated = 0
        self.calls = 0

    def __call__(self, batch: list[list[dict]], admissible: list[list[str]] | None = None) -> list[str]:
        from model import generate

        if self.constrained and admissible is None:
            raise ValueError("a constrained policy needs each state's admissible actions")
        tries = [action_trie(self.tokenizer, a) for a in admissible] if self.constrained else None
        # Constrained: long enough for the longest admissible command (+ eot), whatever max_new_tokens.
        max_new = max(t.max_len for t in tries) if tries else self.max_new_tokens
        max_prompt = self.max_seq_len - max_new

        prompts = []
        for messages in batch:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if len(ids) > max_prompt:
                self.truncated += 1
                ids = ids[-max_prompt:]
            prompts.append(list(ids))
        texts: list[str] = []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.max_batch):
                hook = allowed_tokens_fn(tries[i : i + self.max_batch]) if tries else None
                samples = generate(
                    self.model,
                    prompts[i : i + self.max_batch],
                    num_samples=1,
                    max_new_tokens=max_new,
                    allowed_tokens=hook,
                    temperature=0.0,
                    top_p=1.0,
                    stop_ids=stop_ids(self.tokenizer),
                    seed=0,
                    pad_id=self.tokenizer.pad_id,
                )
                tokens, lengths = samples.tokens.cpu(), samples.lengths.cpu().tolist()
                texts.extend(self.tokenizer.decode(tokens[j, :n].tolist()) for j, n in enumerate(lengths))
        self.calls += 1
        return texts


def model_policy(
    model,
    tokenizer,
    *,
    max_new_tokens: int,
    max_seq_len: int,
    constrained: bool = False,
) -> Callable[[list[list[dict]]], list[str]]:
    """A `harness.evaluate` policy from a model with full weights and its tokenizer."""
    return ModelPolicy(
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        max_seq_len=max_seq_len,
        constrained=constrained,
    )
