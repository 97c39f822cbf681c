"""The batched policy callable that `harness.evaluate` drives: list[messages] -> list[str].

`model_policy` wraps a model whose full weights are present (call it inside
`fsdp.summon_full_params`, or on an unsharded model) and decodes greedily with the same chat
template as training. Prompts longer than the model's context are left-truncated (counted in
`policy.truncated`); with a small history_window that does not happen in practice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.rollout import stop_ids


class ModelPolicy:
    """Greedy (temperature 0) batched policy over chat messages."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int, max_seq_len: int, max_batch: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_prompt = max_seq_len - max_new_tokens
        self.max_batch = max_batch
        self.truncated = 0
        self.calls = 0

    def __call__(self, batch: list[list[dict]]) -> list[str]:
        from model import generate

        prompts = []
        for messages in batch:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if len(ids) > self.max_prompt:
                self.truncated += 1
                ids = ids[-self.max_prompt :]
            prompts.append(list(ids))
        texts: list[str] = []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.max_batch):
                samples = generate(
                    self.model,
                    prompts[i : i + self.max_batch],
                    num_samples=1,
                    max_new_tokens=self.max_new_tokens,
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
    model, tokenizer, *, max_new_tokens: int, max_seq_len: int
) -> Callable[[list[list[dict]]], list[str]]:
    """A `harness.evaluate` policy from a model with full weights and its tokenizer."""
    return ModelPolicy(model, tokenizer, max_new_tokens=max_new_tokens, max_seq_len=max_seq_len)
