"""Tokenizer: any HF `tokenizer.json`, the checkpoint's own chat template and special ids, plus a tiny BPE trainer.

`Tokenizer` wraps a `tokenizers.Tokenizer` used as is; `Tokenizer.from_file(dir)` also reads the
checkpoint's chat template, special-token strings and end ids the way transformers does. LLaMA-3
vocabularies are recognised by their special tokens (their ids found by name, LLaMA-3's chat format
without a template); any other takes bos/eos/pad from its configs and its end-of-turn token from
the template. `tokenizer_from_gguf` builds one from GGUF metadata; `train_tokenizer` a byte-level
BPE with the LLaMA-3 specials at ids 0..5. Details: docs/pieces.md (model/).

References: Meta llama-models `tokenizer.py` / `chat_format.py`; transformers `tokenization_utils_base.py`
(`apply_chat_template`, special tokens, `save_pretrained`); HF tokenizers BPE training docs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from singleturn.model.chat_template import (
    LLAMA3_TEMPLATE,
    ChatTemplateError,
    load_chat_template,
    render_chat_template,
)

__all__ = ["Tokenizer", "train_tokenizer", "tokenizer_from_gguf", "SPECIAL_TOKENS", "ChatTemplateError"]

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
PAD = "<|finetune_right_pad_id|>"
# Order = ids in a tokenizer built by `train_tokenizer` (the "tiny" preset relies on bos 0, eos 1, eot 4).
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]
_LLAMA3_REQUIRED = (BOS, EOS, START_HEADER, END_HEADER, EOT)
_TEMPLATE_VARS = ("bos_token", "eos_token", "pad_token", "unk_token")
_PROBE = "ASSISTANT-TURN-PROBE"  # content whose right neighbour in a rendered chat is the end-of-turn token


class Tokenizer:
    """Text <-> token ids, the checkpoint's chat template, and its special ids.

    Attributes: `bos_id`, `eos_id`, `eot_id` (ends an assistant turn: SFT targets are
    `encode(action) + [eot_id]`), `eos_ids` (tuple of every id that ends generation, eot included),
    `pad_id` (eos when the checkpoint names none), `vocab_size`, `chat_template` (Jinja source or None).
    An id the tokenizer lacks raises ValueError when read.

    `bos_token` .. `unk_token` are the checkpoint's token strings (template variables, as in transformers);
    `stop_ids` are extra end ids (a generation_config's eos_token_id list).
    """

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        stop_ids: Sequence[int] = (),
    ):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.is_llama3 = all(tokenizer.token_to_id(t) is not None for t in _LLAMA3_REQUIRED)
        given = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token)
        if self.is_llama3:
            # Today's ids, found by name, whatever the configs call eos (Meta's instruct configs say <|eot_id|>).
            pad = PAD if tokenizer.token_to_id(PAD) is not None else EOS
            bos, eos, pad, eot = BOS, EOS, pad, EOT
            ends = [t for t in (EOS, EOM, EOT) if tokenizer.token_to_id(t) is not None]
            defaults = dict(bos_token=BOS, eos_token=EOS, pad_token=pad)
            self._template_vars = {k: given[k] or defaults.get(k) for k in _TEMPLATE_VARS}
        else:
            bos, eos, pad = bos_token, eos_token, pad_token or eos_token
            self._template_vars = {**given, "pad_token": pad}
            eot = (self._probe_end_of_turn() if chat_template else None) or eos
            ends = [eos, eot]
        self._ids = {
            name: self._id(tok) for name, tok in (("bos", bos), ("eos", eos), ("pad", pad), ("eot", eot))
        }
        end_ids = [self._id(t) for t in ends] + [int(i) for i in stop_ids]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in end_ids if i is not None))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _need(self, name: str) -> int:
        value = self._ids[name]
        if value is None:
            raise ValueError(
                f"this tokenizer has no {name} token (not in tokenizer_config.json / special_tokens_map.json / "
                "generation_config.json / config.json, or not in its vocabulary)"
            )
        return value

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id."""
        return self._need("bos")

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (the first of eos_ids)."""
        return self._need("eos")

    @property
    def eot_id(self) -> int:
        """End-of-turn id: the token that closes an assistant message."""
        return self._need("eot")

    @property
    def pad_id(self) -> int:
        """Padding id (eos when the checkpoint names none)."""
        return self._need("pad")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` or a checkpoint directory containing one.

        A directory, or a file named exactly `tokenizer.json`, also brings the chat template and special
        tokens of the checkpoint files beside it; any other file name loads the tokenizer alone.
        """
        path = Path(path)
        directory = path if path.is_dir() else (path.parent if path.name == "tokenizer.json" else None)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        tok = _HFTokenizer.from_file(str(path))
        return cls(tok, **(_checkpoint_specials(directory, tok) if directory is not None else {}))

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` (to `path`, or into it when it is a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self._tok.save(str(path))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` (chat template, special tokens) into `directory`.

        `Tokenizer.from_file(directory)` and transformers' `AutoTokenizer.from_pretrained(directory)` then
        render the same chat ids; a LLaMA-3 tokenizer without a template stores `LLAMA3_TEMPLATE`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        template = self.chat_template or (LLAMA3_TEMPLATE if self.is_llama3 else None)
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({k: v for k, v in self._template_vars.items() if v is not None})
        config.update(add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)
        if template is not None:
            config["chat_template"] = template
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )

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
        """Text of `ids`; special tokens (template markers, bos/eos) are dropped unless skip_special=False."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special: bool = True) -> list[str]:
        return self._tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat string of `messages` ([{"role", "content"}, ...]) in the checkpoint's format.

        Raises ChatTemplateError when the tokenizer has neither a chat template nor the LLaMA-3 specials.
        """
        if self.chat_template is not None:
            return render_chat_template(
                self.chat_template,
                messages,
                add_generation_prompt=add_generation_prompt,
                special_tokens=self._template_vars,
            )
        if not self.is_llama3:
            raise ChatTemplateError(
                "this tokenizer has no chat template (no chat_template.jinja, no chat_template in "
                "tokenizer_config.json) and not the LLaMA-3 special tokens, so it cannot format a chat; "
                "add the checkpoint's template to tokenizer_config.json"
            )
        parts = [BOS]
        for m in messages:
            parts.append(f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content']}{EOT}")
        if add_generation_prompt:
            parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
        return "".join(parts)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `render_chat(messages, add_generation_prompt)`, tokenized like transformers does."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def _probe_end_of_turn(self) -> str | None:
        """The special token the template writes right after an assistant message's content, if any."""
        chat = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self.render_chat(chat, add_generation_prompt=False)
        except ChatTemplateError:
            return None  # e.g. a template that insists on a system message: fall back to eos
        at = text.rfind(_PROBE)
        if at < 0:
            return None
        after = self._tok.encode(text[at + len(_PROBE) :], add_special_tokens=False).ids
        special = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return special.get(after[0]) if after else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _checkpoint_specials(directory: Path, tok: _HFTokenizer) -> dict:
    """Tokenizer kwargs from a checkpoint's config files, with transformers' precedence."""
    tok_cfg = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    gen_cfg = _read_json(directory / "generation_config.json")
    model_cfg = _read_json(directory / "config.json")

    def token(name: str) -> str | None:
        value = tok_cfg.get(name) or special_map.get(name)
        return value.get("content") if isinstance(value, dict) else value  # AddedToken dicts or strings

    def ids(key: str) -> list[int]:
        value = gen_cfg.get(key) if gen_cfg.get(key) is not None else model_cfg.get(key)
        return [] if value is None else [int(i) for i in (value if isinstance(value, list) else [value])]

    def by_id(key: str) -> str | None:
        found = ids(key)
        return tok.id_to_token(found[0]) if found else None

    return dict(
        chat_template=load_chat_template(directory),
        bos_token=token("bos_token") or by_id("bos_token_id"),
        eos_token=token("eos_token") or by_id("eos_token_id"),
        pad_token=token("pad_token") or by_id("pad_token_id"),
        unk_token=token("unk_token"),
        stop_ids=ids("eos_token_id"),
    )


# llama.cpp pre-tokenizer names (GGUF tokenizer.ggml.pre) -> how they split text (llama-vocab.cpp); others refused.
# "default" (also a missing key) is read as GPT-2's regex, as transformers' GGUF loader does.
_GPT2_PRE = ("default", "gpt2", "gpt-2")
# every digit alone, then GPT-2's regex (SmolLM2's own tokenizer.json does the same)
_DIGITS_PRE = ("smollm",)
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType


def tokenizer_from_gguf(meta: dict) -> tuple[_HFTokenizer, dict]:
    """(tokenizers.Tokenizer, tokenizer_config.json dict) from a GGUF's byte-level BPE metadata.

    `meta` maps GGUF keys (`tokenizer.ggml.tokens`, `.merges`, `.token_type`, `.pre`, `.*_token_id`,
    `tokenizer.chat_template[.name]`) to values. Control tokens become special added tokens (matched whole,
    dropped by decode), user-defined ones plain added tokens. Raises ValueError for anything else than
    `tokenizer.ggml.model == "gpt2"` or an unknown pre-tokenizer.
    """
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    known = _GPT2_PRE + _DIGITS_PRE + _LLAMA3_PRE
    if kind != "gpt2":
        raise ValueError(f"tokenizer model {kind!r} is not supported (only 'gpt2': byte-level BPE)")
    if pre not in known:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (known: {', '.join(known)})")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise ValueError("tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = _gguf_vocab(tokens, types)
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"malformed merge {merges[next(i for i, p in enumerate(pairs) if len(p) != 2)]!r}")
    # llama.cpp's LLaMA-3 vocabulary takes a word that is itself a token whole (ignore_merges, as Meta's file).
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _LLAMA3_PRE))
    tok.pre_tokenizer = _gguf_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    marked = list(zip(tokens, types))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in marked if k == _CONTROL]
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in marked if k == _USER_DEFINED])
    config = _gguf_tokenizer_config(meta, tokens, tok)
    return tok, config


def _gguf_vocab(tokens: list[str], types: list[int]) -> dict[str, int]:
    """{token: id}: ordinary tokens in GPT-2's byte alphabet; control / user tokens as written."""
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (token, kind_i) in enumerate(zip(tokens, types)):
        # Ordinary tokens are stored in GPT-2's byte alphabet; control / user tokens are matched as written.
        if kind_i not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        if vocab.setdefault(token, i) != i:
            raise ValueError(f"token {token!r} appears twice in the vocabulary (ids {vocab[token]} and {i})")
    return vocab


def _gguf_pre_tokenizer(pre: str):
    """The pre-tokenizer `tokenizer.ggml.pre` names (GPT-2's, SmolLM's digits + GPT-2, LLaMA-3's)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _LLAMA3_PRE)
    if pre in _LLAMA3_PRE:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level])
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _gguf_tokenizer_config(meta: dict, tokens: list[str], tok: _HFTokenizer) -> dict:
    """tokenizer_config.json from the metadata (special tokens, add_bos/eos, chat templates); sets
    `tok`'s post-processor when the metadata asks for bos / eos to be added."""
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            config[f"{name}_token"] = tokens[i]
    add_bos, add_eos = (bool(meta.get(f"tokenizer.ggml.add_{n}_token", False)) for n in ("bos", "eos"))
    config.update(add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False)
    first = [config["bos_token"]] if add_bos and "bos_token" in config else []
    last = [config["eos_token"]] if add_eos and "eos_token" in config else []
    if first or last:  # what add_bos_token / add_eos_token ask for when special tokens are added
        tok.post_processor = processors.TemplateProcessing(
            single=[*first, "$A", *last],
            pair=[*first, "$A", *last, *(f"{t}:1" for t in first), "$B:1", *(f"{t}:1" for t in last)],
            special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(first + last)],
        )
    template = meta.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = [{"name": k.removeprefix(prefix), "template": v} for k, v in meta.items() if k.startswith(prefix)]
    if named:  # transformers' list form; "default" is the one rendered
        config["chat_template"] = ([{"name": "default", "template": template}] if template else []) + named
    elif template:
        config["chat_template"] = template
    return config


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the rest for chr(256 + k)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelling = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + len(spelling) - len(printable))
    return spelling


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
