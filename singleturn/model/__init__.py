"""Minimal LLaMA-3: config + presets, Transformer, HF safetensors I/O, tokenizer + chat template, sampling,
packed-row layouts (GRPO groups sharing their prompt, packed SFT) and their attention masks.

Plain single-device PyTorch; parallelism is applied from outside (trainer/fsdp.py). The GGUF converter
(`convert_gguf`, `ensure_converted_from_wheel`, `GGUFError`) is imported on first use, so that
`python -m singleturn.model.convert` does not run a module already imported by its package.
"""

from singleturn.model.chat_template import ChatTemplateError
from singleturn.model.config import PRESETS, LlamaConfig, RopeScaling
from singleturn.model.episode_cache import EpisodeCache
from singleturn.model.episode_policy import EpisodePolicy
from singleturn.model.generate import Samples, generate, score_continuations
from singleturn.model.hf_io import hf_to_ours, load_hf_checkpoint, ours_to_hf, save_hf_checkpoint
from singleturn.model.masks import (
    PackedRows,
    SegmentMask,
    build_packed_causal_batch,
    build_shared_prefix_batch,
    pack_by_tokens,
)
from singleturn.model.tokenizer import Tokenizer, train_tokenizer
from singleturn.model.transformer import Transformer

__all__ = [
    "EpisodeCache",
    "EpisodePolicy",
    "PRESETS",
    "LlamaConfig",
    "RopeScaling",
    "Transformer",
    "hf_to_ours",
    "ours_to_hf",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
    "Tokenizer",
    "train_tokenizer",
    "ChatTemplateError",
    "convert_gguf",
    "ensure_converted_from_wheel",
    "GGUFError",
    "Samples",
    "generate",
    "score_continuations",
    "SegmentMask",
    "PackedRows",
    "pack_by_tokens",
    "build_shared_prefix_batch",
    "build_packed_causal_batch",
]

_CONVERT = ("convert_gguf", "ensure_converted_from_wheel", "GGUFError")


def __getattr__(name: str):
    if name in _CONVERT:
        # lazily: `python -m singleturn.model.convert` must not find its module already imported
        from singleturn.model import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'singleturn.model' has no attribute {name!r}")
