"""Reading a llama-architecture GGUF (llama.cpp): metadata -> `LlamaConfig`, tensors -> HF-named fp32 tensors.

Every tensor is dequantized by the `gguf` package, and the q/k rows that llama.cpp permutes for its
RoPE layout are put back in HF order; LLaMA-3.1-style RoPE scaling, stored as a `rope_freqs`
tensor, is recognised when its factors are those of a released model (or of the file's own
rope.scaling metadata). Anything else (another architecture, a tensor type the gguf package cannot
dequantize, biases, a truncated file) is a `GGUFError` naming the file and the offender.
`model.convert` writes the HF directory from what this module reads.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from singleturn.model.config import LlamaConfig, RopeScaling

__all__ = ["GGUFError", "SUPPORTED_TYPES", "read_gguf", "llama_config", "hf_tensors"]


class GGUFError(ValueError):
    """A GGUF file this converter cannot convert; the message names the file and what is unsupported."""


# Tensor types converted (all dequantized to fp32 by gguf.quants.dequantize).
SUPPORTED_TYPES = (
    *("F32", "F16", "BF16"),  # float
    *("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),  # legacy block quants
    *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),  # k-quants
)
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
# llama3 RoPE parameters of the released models, tried against a file's rope_freqs tensor.
_KNOWN_LLAMA3_ROPE = (
    RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    RopeScaling(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
)


def read_gguf(path: Path):
    """(GGUFReader, metadata dict); any failure to parse becomes a GGUFError naming the file."""
    from gguf import GGUFReader  # optional: the `pretrained` extra (model.convert imports without it)

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):  # a tensor type id this gguf package does not know
            raise GGUFError(
                f"{path}: unknown tensor type ({e}); supported: {', '.join(SUPPORTED_TYPES)}"
            ) from e
        raise GGUFError(f"{path}: not a readable GGUF file ({size} bytes; truncated or corrupt?): {e}") from e
    except Exception as e:  # numpy/IndexError from a file cut inside its header or tensor data
        raise GGUFError(
            f"{path}: not a readable GGUF file ({size} bytes; truncated or corrupt?): {e!r}"
        ) from e
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(
                f"{path}: truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} > {size}"
            )
    return reader, {name: _value(field) for name, field in reader.fields.items()}


def _value(field):
    """A metadata field's value: scalar, str, or list (read from the raw parts, stable across gguf versions)."""
    from gguf import GGUFValueType  # optional: the `pretrained` extra

    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0] if kind is not None else None


def llama_config(meta: dict, reader, path: Path) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (only 'llama')")

    def key(name, default=None, required=True):
        value = meta.get(f"llama.{name}", default)
        if value is None and required:
            raise GGUFError(f"{path}: metadata key llama.{name} is missing")
        return value

    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = dim // n_heads
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if key(name, head_dim) != head_dim:
            raise GGUFError(f"{path}: llama.{name} = {key(name)} != head_dim {head_dim} (not supported)")
    if key("expert_count", 0):
        raise GGUFError(
            f"{path}: mixture-of-experts llama (llama.expert_count = {key('expert_count')}) is not supported"
        )
    scaling = key("rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported (only none or llama3 rope_freqs)")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    vocab_size = int(names["token_embd.weight"].shape[1])  # GGML shape: (dim, vocab)
    rope_theta = float(key("rope.freq_base", 10000.0))
    rope_scaling = None
    if "rope_freqs.weight" in names:
        factors = _dequantize(names["rope_freqs.weight"], path).reshape(-1)
        rope_scaling = _llama3_rope(factors, rope_theta, head_dim, meta, path)
    return LlamaConfig(
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        vocab_size=vocab_size,
        ffn_dim=int(key("feed_forward_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
    )


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, meta: dict, path: Path) -> RopeScaling:
    """The RopeScaling whose llama3 frequency divisors are `factors` (llama.cpp's rope_freqs tensor)."""
    candidates = list(_KNOWN_LLAMA3_ROPE)
    stated = (meta.get("llama.rope.scaling.factor"), meta.get("llama.rope.scaling.original_context_length"))
    if all(stated):
        candidates.insert(
            0, RopeScaling(factor=float(stated[0]), original_max_position_embeddings=int(stated[1]))
        )
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
    for c in candidates:
        ctx = c.original_max_position_embeddings
        smooth = (ctx / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor)
        scaled = np.where(wavelen > ctx / c.low_freq_factor, c.factor, 1 / ((1 - smooth) / c.factor + smooth))
        expected = np.where(wavelen < ctx / c.high_freq_factor, 1.0, scaled)
        if factors.shape == expected.shape and np.allclose(factors, expected, rtol=1e-5, atol=0):
            return c
    raise GGUFError(
        f"{path}: rope_freqs (llama3 RoPE scaling) matches none of the known parameter sets {candidates}; "
        f"factors {factors[:4].tolist()}...{factors[-4:].tolist()}"
    )


def _dequantize(t, path: Path) -> np.ndarray:
    """fp32 array in HF shape (GGML lists dims innermost first)."""
    from gguf import quants  # optional: the `pretrained` extra

    if t.tensor_type.name not in SUPPORTED_TYPES:
        raise GGUFError(
            f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its RoPE pairs rows 2i, 2i+1; HF's rotate_half pairs i, i+hd/2)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def hf_tensors(reader, config: LlamaConfig, path: Path) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors, q/k un-permuted; every expected tensor present, nothing unknown."""
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into config.rope_scaling
        m = _LAYER_RE.match(t.name)
        if t.name in _GLOBAL:
            name = _GLOBAL[t.name]
        elif m and m.group(2) in _LAYER and int(m.group(1)) < config.n_layers:
            name = f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
        else:
            raise GGUFError(f"{path}: tensor {t.name!r} has no counterpart in a llama model (biases, MoE?)")
        w = _dequantize(t, path)
        if m and m.group(2) in ("attn_q", "attn_k"):
            w = _unpermute(w, config.n_heads if m.group(2) == "attn_q" else config.n_kv_heads)
        out[name] = torch.tensor(w)  # a copy: the reader's arrays are views of a read-only memmap
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{v}.weight" for i in range(config.n_layers) for v in _LAYER.values()
    }
    missing = sorted(expected - out.keys())
    if missing:
        raise GGUFError(f"{path}: tensors missing: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    return out
