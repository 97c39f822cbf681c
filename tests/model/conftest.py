"""Shared fixtures for tests/model: tiny random HF LLaMA models and our Transformer with the same weights."""

from __future__ import annotations

import pytest
import torch

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small so that all three wavelength bands (kept, smoothed, scaled) occur at head_dim 16.
    "original_max_position_embeddings": 32,
}


def hf_config(*, n_kv_heads=2, vocab_size=1003, tie=False, rope_scaling=True, n_layers=2, dim=64, n_heads=4):
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        hidden_size=dim,
        intermediate_size=160,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        vocab_size=vocab_size,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        rope_theta=10000.0,
        rope_scaling=dict(LLAMA3_ROPE) if rope_scaling else None,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def random_hf_model(seed=0, **kw):
    """A random HF LlamaForCausalLM (fp32, eval mode) with non-trivial norm weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return hf


def ours_from_hf(hf):
    """Our Transformer holding a copy of `hf`'s weights (through the HF name map)."""
    from singleturn.model.config import LlamaConfig
    from singleturn.model.hf_io import hf_to_ours
    from singleturn.model.transformer import Transformer

    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    model = Transformer(cfg)
    sd = {hf_to_ours(k): v.clone() for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("output.weight", None)
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture
def hf_pair():
    """Factory: (hf_model, our_model) with identical random weights."""

    def make(seed=0, **kw):
        hf = random_hf_model(seed, **kw)
        return hf, ours_from_hf(hf)

    return make
