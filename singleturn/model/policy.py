"""How a checkpoint is played: `PolicySpec` (written as `policy.json` next to its weights, so
`load_policy(dir)` plays exactly the policy a run evaluated with) and `sample_completions`, the GRPO
rollout's batched sampling of whole prompts. Every policy that acts in episodes (evaluation, the
multi-turn rollouts, grpo-dagger's play, the bound's teacher-forced agreement) is one class,
`model.EpisodePolicy`, in either prompt format; the prompt-length rule is in model/completion.py.

Nothing here knows of torch.distributed, the trainer or TextWorld.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from singleturn.model.completion import Completion, encode_prompt, prompt_budget, response_room, stop_ids
from singleturn.model.episode_policy import EpisodePolicy
from singleturn.model.generate import generate
from singleturn.model.hf_io import load_hf_checkpoint
from singleturn.model.tokenizer import Tokenizer

__all__ = [
    "DECODINGS",
    "POLICY_FILE",
    "Completion",
    "PolicySpec",
    "encode_prompt",
    "prompt_budget",
    "response_room",
    "load_policy",
    "sample_completions",
    "stop_ids",
]

DECODINGS = ("greedy", "rank")
"""Evaluation decodings: token-by-token greedy (free, or under the admissible trie), or ranking the
admissible commands."""

POLICY_FILE = "policy.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Config dtype names -> torch dtypes (the one map; the trainer's configs use these names)."""


def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    top_p: float = 1.0,
    top_k: int = 0,
    allowed_tokens=None,
    max_cache_bytes: int = 0,
) -> list[Completion]:
    """`num_samples` completions per prompt, prompt-major (prompt i's are i*S .. i*S+S-1), trimmed.
    max_cache_bytes > 0 bounds each batch's KV cache (`generate` decodes in chunks beyond it)."""
    samples = generate(
        model,
        prompts,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_ids=stop_ids(tokenizer),
        seed=seed,
        pad_id=tokenizer.pad_id,
        allowed_tokens=allowed_tokens,
        max_cache_bytes=max_cache_bytes,
    )
    tokens = samples.tokens.cpu()  # (B*S, max_new)
    logp = samples.logprobs.float().cpu()  # (B*S, max_new)
    out = []
    for i, n in enumerate(samples.lengths.cpu().tolist()):
        ids = tokens[i, :n].tolist()
        out.append(Completion(ids, logp[i, :n].clone(), tokenizer.decode(ids)))
    return out


@dataclass(kw_only=True)
class PolicySpec:
    """How a checkpoint was evaluated: written as `policy.json` next to its weights."""

    decoding: str = "greedy"
    constrained: bool = False
    max_new_tokens: int = 24
    dtype: str = "float32"
    """Weights dtype during evaluation (the rollout dtype)."""
    history_window: int = 3
    """harness.render_prompt's history window."""
    system_prompt: bool = True
    """harness.render_prompt's system message."""
    max_steps: int = 50
    """Episode step limit of the evaluation."""
    prompt: str = "window"
    """'window' (harness.render_prompt: each turn's prompt written afresh, left-truncated to fit) or
    'episode' (harness.render_episode: each live episode one growing token sequence)."""
    list_admissible: bool = True
    """prompt='episode': this turn's admissible list as a per-turn suffix."""
    batch_size: int = 8
    """Episodes played in lockstep (one batched forward per turn)."""
    max_len: int = 0
    """The longest sequence a cache row holds (0: the model's max_seq_len): an episode-format episode
    longer than it is an error, never a truncation; a window prompt is left-truncated to fit."""

    def policy(self, model, tokenizer) -> EpisodePolicy:
        """The policy this spec describes over `model` (full weights) and its tokenizer."""
        if self.decoding not in DECODINGS:
            raise ValueError(f"evaluation decodes by 'greedy' or 'rank', got {self.decoding!r}")
        return EpisodePolicy(
            model,
            tokenizer,
            prompt=self.prompt,
            decoding=self.decoding,
            constrained=self.constrained,
            max_new_tokens=self.max_new_tokens,
            max_episodes=self.batch_size,
            max_len=self.max_len or model.config.max_seq_len,
            history_window=self.history_window,
            list_admissible=self.list_admissible,
            system_prompt=self.system_prompt,
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / POLICY_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> PolicySpec:
        """The spec in `directory/policy.json`, or the defaults when the checkpoint has none."""
        path = Path(directory) / POLICY_FILE
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown policy settings {unknown}")
        return cls(**raw)


def load_policy(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[EpisodePolicy, PolicySpec]:
    """(policy, PolicySpec) of an exported checkpoint dir (config.json, *.safetensors, tokenizer)."""
    spec = PolicySpec.load(directory)
    model, _ = load_hf_checkpoint(directory, device=device, dtype=torch.float32)
    for p in model.parameters():  # parameters only, as fsdp.summon_full_params(dtype) gives them
        p.data = p.data.to(DTYPES[spec.dtype])
    tokenizer = Tokenizer.from_file(directory)
    policy = spec.policy(model, tokenizer)
    policy.name = str(directory)
    return policy, spec
