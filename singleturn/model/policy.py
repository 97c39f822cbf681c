"""From chat messages to actions: prompt encoding, generate-and-trim, and the evaluation policy.

The ONE place where a prompt becomes token ids (`encode_prompt`, with the length policy: a prompt
longer than `max_tokens` keeps its LAST ids and reports `truncated`) and a generation becomes
response tokens (`sample_completions`), used by SFT/GRPO data, the rollouts, evaluation and the
harness CLI. `ModelPolicy` is the batched `harness.evaluate` policy (greedy, trie-greedy or ranked);
`PolicySpec` / `policy.json` record the settings a run evaluated with, so `load_policy(dir)` plays
exactly that policy. Details: docs/pieces.md (model/).

Nothing here knows of torch.distributed, the trainer or TextWorld; the harness imports it lazily.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from singleturn.model.completion import Completion, stop_ids
from singleturn.model.constrained import action_trie, allowed_tokens_fn
from singleturn.model.episode_policy import EpisodePolicy
from singleturn.model.generate import generate, score_continuations
from singleturn.model.hf_io import load_hf_checkpoint
from singleturn.model.tokenizer import Tokenizer

__all__ = [
    "DECODINGS",
    "POLICY_FILE",
    "Completion",
    "ModelPolicy",
    "PolicySpec",
    "encode_prompt",
    "prompt_budget",
    "response_room",
    "load_policy",
    "sample_completions",
    "stop_ids",
]

DECODINGS = ("greedy", "rank")
"""Evaluation decodings: token-by-token greedy, or ranking the admissible commands."""

POLICY_FILE = "policy.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""Config dtype names -> torch dtypes (the one map; the trainer's configs use these names)."""


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
    """Tokens the evaluation policy may add after a state's prompt: ranked and constrained decoding
    produce an admissible command + end of turn (the longest one bounds it), free greedy max_new_tokens."""
    if decoding == "rank" or constrained:
        return max(len(tokenizer.encode(a)) + 1 for a in admissible)
    return max_new_tokens


def encode_prompt(tokenizer, messages: Sequence[dict], max_tokens: int) -> tuple[list[int], bool]:
    """(ids, truncated): the chat-template ids of `messages` + the generation prompt, cut to the last
    `max_tokens` ids when longer (the module's length policy)."""
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    if len(ids) > max_tokens:
        return ids[-max_tokens:], True
    return ids, False


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
) -> list[Completion]:
    """`num_samples` completions per prompt, prompt-major (prompt i's are i*S .. i*S+S-1), trimmed."""
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
    )
    tokens = samples.tokens.cpu()  # (B*S, max_new)
    logp = samples.logprobs.float().cpu()  # (B*S, max_new)
    out = []
    for i, n in enumerate(samples.lengths.cpu().tolist()):
        ids = tokens[i, :n].tolist()
        out.append(Completion(ids, logp[i, :n].clone(), tokenizer.decode(ids)))
    return out


class ModelPolicy:
    """Deterministic batched policy over chat messages (greedy, trie-greedy or ranked; see module)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int,
        max_seq_len: int,
        max_batch: int = 64,
        constrained: bool = False,
        decoding: str = "greedy",
    ):
        if decoding not in DECODINGS:
            raise ValueError(f"decoding={decoding!r}: one of {DECODINGS}")
        self.model = model
        self.constrained = constrained
        self.decoding = decoding
        self.wants_admissible = constrained or decoding == "rank"  # harness.evaluate passes admissible=
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_seq_len = max_seq_len
        self.max_batch = max_batch
        self.truncated = 0
        self.calls = 0

    def __call__(self, batch: list[list[dict]], admissible: list[list[str]] | None = None) -> list[str]:
        if self.wants_admissible and admissible is None:
            kind = "ranking" if self.decoding == "rank" else "constrained"
            raise ValueError(f"a {kind} policy needs each state's admissible actions")
        if self.decoding == "rank":
            return self._rank(batch, admissible)
        tries = [action_trie(self.tokenizer, a) for a in admissible] if self.constrained else None
        # Constrained: long enough for the longest admissible command (+ eot), whatever max_new_tokens.
        max_new = max(t.max_len for t in tries) if tries else self.max_new_tokens
        prompts = self._prompts(batch, prompt_budget(self.max_seq_len, max_new))
        texts: list[str] = []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.max_batch):
                hook = allowed_tokens_fn(tries[i : i + self.max_batch]) if tries else None
                done = sample_completions(
                    self.model,
                    self.tokenizer,
                    prompts[i : i + self.max_batch],
                    num_samples=1,
                    max_new_tokens=max_new,
                    temperature=0.0,
                    seed=0,
                    allowed_tokens=hook,
                )
                texts.extend(c.text for c in done)
        self.calls += 1
        return texts

    def _prompts(self, batch: list[list[dict]], max_prompt: int) -> list[list[int]]:
        prompts = []
        for messages in batch:
            ids, cut = encode_prompt(self.tokenizer, messages, max_prompt)
            self.truncated += cut
            prompts.append(ids)
        return prompts

    def _rank(self, batch: list[list[dict]], admissible: list[list[str]]) -> list[str]:
        """The admissible command with the highest total log-prob (as SFT targets: action + eot)."""
        if any(not a for a in admissible):
            raise ValueError("ranking needs at least one admissible action per state")
        cands = [[self.tokenizer.encode(a) + [self.tokenizer.eot_id] for a in acts] for acts in admissible]
        longest = max(len(c) for row in cands for c in row)
        prompts = self._prompts(batch, prompt_budget(self.max_seq_len, longest))
        scores = score_continuations(self.model, prompts, cands)
        self.calls += 1
        # Ties (exact in fp64 only for identical token sequences) go to the first listed command.
        return [acts[max(range(len(acts)), key=row.__getitem__)] for acts, row in zip(admissible, scores)]


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
    """'window' (harness.render_prompt, one prompt per state) or 'episode' (harness.render_episode:
    each live episode one growing token sequence, model.EpisodePolicy: ranked, or greedy under the
    admissible trie)."""
    list_admissible: bool = True
    """prompt='episode': this turn's admissible list as a per-turn suffix."""
    batch_size: int = 8
    """Episodes played in lockstep (one batched forward per turn)."""
    max_len: int = 0
    """prompt='episode': the longest episode (tokens, this turn's included) a cache row holds; longer
    is an error, never a truncation (0: the model's max_seq_len)."""

    def policy(self, model, tokenizer):
        """The policy this spec describes (ModelPolicy, or EpisodePolicy for prompt='episode'),
        over `model` (full weights) and its tokenizer."""
        if self.prompt == "episode":
            if self.decoding == "greedy" and not self.constrained:
                raise ValueError(
                    "prompt='episode' decodes ranked or greedy under the admissible trie: set constrained"
                )
            return EpisodePolicy(
                model,
                tokenizer,
                decoding=self.decoding,
                max_episodes=self.batch_size,
                max_len=self.max_len or model.config.max_seq_len,
                list_admissible=self.list_admissible,
                system_prompt=self.system_prompt,
            )
        if self.prompt != "window":
            raise ValueError(f"prompt must be 'window' or 'episode', got {self.prompt!r}")
        return ModelPolicy(
            model,
            tokenizer,
            max_new_tokens=self.max_new_tokens,
            max_seq_len=model.config.max_seq_len,
            constrained=self.constrained,
            decoding=self.decoding,
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
) -> tuple[ModelPolicy, PolicySpec]:
    """(ModelPolicy, PolicySpec) of an exported checkpoint dir (config.json, *.safetensors, tokenizer)."""
    spec = PolicySpec.load(directory)
    model, _ = load_hf_checkpoint(directory, device=device, dtype=torch.float32)
    for p in model.parameters():  # parameters only, as fsdp.summon_full_params(dtype) gives them
        p.data = p.data.to(DTYPES[spec.dtype])
    tokenizer = Tokenizer.from_file(directory)
    policy = spec.policy(model, tokenizer)
    policy.name = str(directory)
    return policy, spec
