"""HF safetensors checkpoints <-> `Transformer`: load without a second copy in memory, save what HF loads.

Format: a directory with `config.json` and either `model.safetensors` or shards
`model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json` (the layout
`LlamaForCausalLM.save_pretrained` writes). The weight names differ from ours only by a fixed map
(`hf_to_ours`); q/k rows need no permutation because `model.transformer` uses HF's rotate_half RoPE.
With tied embeddings HF omits `lm_head.weight`; we do the same when saving and accept either when
loading (a stored lm_head equal in shape is ignored in favour of the tie, as HF does).

Loading builds the model on the meta device and assigns the tensors read from disk (safetensors
`safe_open(..., device=...)` reads straight to the target device), so peak memory is one copy.

References: HF `modeling_utils.PreTrainedModel.save_pretrained / from_pretrained`;
safetensors docs; gpt-fast `scripts/convert_hf_checkpoint.py`.
"""

from __future__ import annotations

import re

__all__ = ["hf_to_ours", "ours_to_hf"]

_GLOBAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OUR_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_to_ours(name: str) -> str | None:
    """HF LlamaForCausalLM tensor name -> our state-dict name (None if it has no counterpart)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def ours_to_hf(name: str) -> str:
    """Our state-dict name -> HF LlamaForCausalLM tensor name."""
    if name in _GLOBAL_INV:
        return _GLOBAL_INV[name]
    m = _OUR_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_INV:
        return f"model.layers.{m.group(1)}.{_LAYER_INV[m.group(2)]}"
    raise KeyError(f"no HF name for parameter {name!r}")
