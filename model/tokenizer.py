"""LLaMA-3 tokenizer wrapper and chat template, plus a small byte-level BPE trainer for tiny models.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the `tokenizer.json` shipped with HF LLaMA-3 checkpoints,
used as is) and finds the LLaMA-3 special tokens by name. The chat format is LLaMA-3's header /
`<|eot_id|>` layout, rendered as a string and tokenized in one pass (as HF `apply_chat_template`
does, so special-token strings become their ids):

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...
    <|start_header_id|>assistant<|end_header_id|>\\n\\n          (add_generation_prompt)

`train_tokenizer` builds a byte-level BPE (GPT-2 pre-tokenizer regex, byte fallback alphabet) with
the same special tokens at ids 0..5, so a tiny from-scratch model speaks the same chat format.

References: Meta llama-models `tokenizer.py` / `chat_format.py`; HF tokenizers BPE training docs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["Tokenizer", "train_tokenizer", "SPECIAL_TOKENS"]

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
PAD = "<|finetune_right_pad_id|>"
# Order = ids in a tokenizer built by `train_tokenizer` (the "tiny" preset relies on bos 0, eos 1, eot 4).
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]


class Tokenizer:
    """Text <-> token ids with the LLaMA-3 special tokens and chat template.

    Attributes: `bos_id` (<|begin_of_text|>), `eot_id` (<|eot_id|>, ends an assistant turn),
    `eos_ids` (ids that end generation: <|end_of_text|>, <|eom_id|>, <|eot_id|> where present),
    `pad_id` (<|finetune_right_pad_id|> if present, else <|end_of_text|>), `vocab_size`.
    """

    def __init__(self, tokenizer: _HFTokenizer):
        self._tok = tokenizer
        missing = [t for t in (BOS, EOS, START_HEADER, END_HEADER, EOT) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the LLaMA-3 special tokens {missing}")
        self.bos_id: int = tokenizer.token_to_id(BOS)
        self.eos_id: int = tokenizer.token_to_id(EOS)
        self.eot_id: int = tokenizer.token_to_id(EOT)
        self.eos_ids: tuple[int, ...] = tuple(
            i for i in (tokenizer.token_to_id(t) for t in (EOS, EOM, EOT)) if i is not None
        )
        pad = tokenizer.token_to_id(PAD)
        self.pad_id: int = pad if pad is not None else self.eos_id

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` (or a directory containing one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(_HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` (to `path`, or into it when it is a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self._tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's vocab_size must be >= this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings in it map to their ids); optional leading bos."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False) -> list[list[int]]:
        """`encode` for many texts (parallel in the Rust library)."""
        out = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return [[self.bos_id, *ids] for ids in out] if bos else out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless skip_special=False."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special: bool = True) -> list[str]:
        return self._tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special)

    @staticmethod
    def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The LLaMA-3 chat string of `messages` ([{"role", "content"}, ...])."""
        parts = [BOS]
        for m in messages:
            parts.append(f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content']}{EOT}")
        if add_generation_prompt:
            parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
        return "".join(parts)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `render_chat(messages, add_generation_prompt)` (starts with bos_id)."""
        return self.encode(self.render_chat(messages, add_generation_prompt))


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with the LLaMA-3 special tokens at ids 0..5 (see SPECIAL_TOKENS).

    `vocab_size` counts the specials and the 256 byte symbols; every string is encodable.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
