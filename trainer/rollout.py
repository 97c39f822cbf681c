"""In-process rollouts: G sampled responses per state from the current policy.

The rollout phase gathers the full weights ONCE (`fsdp.summon_full_params`, in rollout.dtype), runs
`model.generate` (static KV cache; each prompt is prefilled once and its cache broadcast to its G
rows), and frees the full weights on exit, returning to sharded training. The sampled tokens'
log-probs come back with the samples: they are the behaviour policy of the GRPO ratio.

The sampling seed is a pure function of (run seed, step, rank), so a resumed run draws the same
responses as the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Rollout:
    prompts: list[list[int]]
    """One prompt per state (B)."""
    responses: list[list[int]]
    """B*G sampled responses (prompt-major), trimmed to their length (stop token included)."""
    logprobs: list[torch.Tensor]
    """B*G fp32 [len] sampled-token log-probs (cpu)."""
    texts: list[str]
    """Decoded responses (special tokens skipped)."""


def rollout_seed(run_seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible sampling seed per (run, step, rank)."""
    return (run_seed * 1_000_003 + step * 7919 + rank * 104_729 + 1) & 0x7FFF_FFFF


def stop_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end a response: <|eot_id|> and the tokenizer's other end-of-sequence ids."""
    ids = {tokenizer.eot_id}
    ids.update(getattr(tokenizer, "eos_ids", ()) or ())
    return tuple(sorted(ids))


def sample_responses(model, fsdp, tokenizer, prompts: list[list[int]], cfg, *, seed: int) -> Rollout:
    """Sample cfg.group_size responses per prompt with the gathered full weights (RolloutConfig cfg)."""
    from model import generate

    with fsdp.summon_full_params(dtype=_DTYPES[cfg.dtype]):
        samples = generate(
            model,
            prompts,
            num_samples=cfg.group_size,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            stop_ids=stop_ids(tokenizer),
            seed=seed,
            pad_id=tokenizer.pad_id,
        )
    tokens = samples.tokens.cpu()  # (B*G, max_new)
    logp = samples.logprobs.float().cpu()  # (B*G, max_new)
    lengths = samples.lengths.cpu().tolist()
    responses = [tokens[i, :n].tolist() for i, n in enumerate(lengths)]
    return Rollout(
        prompts=prompts,
        responses=responses,
        logprobs=[logp[i, :n].clone() for i, n in enumerate(lengths)],
        texts=[tokenizer.decode(r) for r in responses],
    )
