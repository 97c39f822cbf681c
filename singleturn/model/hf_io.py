"""HF safetensors checkpoints <-> `Transformer`: load without a second copy in memory, save what HF loads.

A directory with `config.json` and `model.safetensors` or its shards (what `save_pretrained`
writes); names differ from ours by a fixed map (`hf_to_ours`), tied embeddings omit `lm_head.weight`
as HF does. Loading builds the model on the meta device and assigns tensors read straight to the
target device: peak memory is one copy. Details: docs/pieces.md (model/).

References: HF `modeling_utils.PreTrainedModel.save_pretrained / from_pretrained`;
safetensors docs; gpt-fast `scripts/convert_hf_checkpoint.py`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from singleturn.model.config import LlamaConfig
from singleturn.model.transformer import Transformer

__all__ = ["load_hf_checkpoint", "save_hf_checkpoint", "hf_to_ours", "ours_to_hf"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

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


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {index} does not exist")
        return files
    raise FileNotFoundError(f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE}")


def load_hf_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, LlamaConfig]:
    """Load an HF LLaMA checkpoint directory -> (Transformer in eval mode, LlamaConfig).

    Tensors keep their stored dtype unless `dtype` is given. Strict: a missing, unexpected or
    wrong-shape tensor, a missing config.json or an unreadable/truncated safetensors file raises an
    error naming the tensor and the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: config.json is missing from the checkpoint")
    config = LlamaConfig.from_hf(config_file)
    files = _weight_files(path)
    device = torch.device(device)

    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("output.weight")
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device=str(device))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise ValueError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from e
        with handle:
            for hf_name in handle.keys():
                name = hf_to_ours(hf_name)
                if name is None:
                    if hf_name.endswith("rotary_emb.inv_freq"):  # stored by some old exports; recomputed
                        continue
                    raise ValueError(f"unexpected tensor {hf_name!r} in {file}")
                if config.tie_word_embeddings and name == "output.weight":
                    continue  # tied: the head is the embedding (HF ignores a stored copy too)
                if name in loaded:
                    raise ValueError(f"tensor {hf_name!r} appears twice (again in {file})")
                try:
                    tensor = handle.get_tensor(hf_name)
                except Exception as e:
                    raise ValueError(f"{file}: cannot read tensor {hf_name!r} (truncated?): {e}") from e
                if tensor.shape != expected[name]:
                    raise ValueError(
                        f"tensor {hf_name!r} in {file} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(expected[name])} from config.json"
                    )
                loaded[name] = tensor.to(dtype) if dtype is not None else tensor
    missing = sorted(ours_to_hf(k) for k in expected.keys() - loaded.keys())
    if missing:
        raise ValueError(f"tensors missing from {path}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    # assign=True adopts the loaded tensors as the parameters: no second allocation.
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    model.init_buffers(device)
    return model.eval(), config


def save_hf_checkpoint(
    model: Transformer,
    path: str | Path,
    *,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write config.json + safetensors that `LlamaForCausalLM.from_pretrained(path)` loads.

    One `model.safetensors`, or shards + `model.safetensors.index.json` when the tensors exceed
    `max_shard_bytes`. Weights are stored in `dtype` (default: as they are). Tied models omit
    lm_head.weight, like HF. Stale weight files from an earlier save in `path` are removed first.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("output.weight")
    names = list(state)
    out_dtype = dtype or state[names[0]].dtype
    item = torch.empty((), dtype=out_dtype).element_size()
    sizes = {n: state[n].numel() * item for n in names}

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for n in names:
        if max_shard_bytes is not None and shards[-1] and shard_bytes + sizes[n] > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(n)
        shard_bytes += sizes[n]

    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # One shard at a time on the CPU: the host holds at most one shard's copy.
        tensors = {ours_to_hf(n): state[n].detach().to("cpu", out_dtype).contiguous() for n in shard}
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        os.chmod(
            path / fname, 0o644
        )  # safetensors writes 0600; an exported model is shared, as converted ones
        weight_map.update(dict.fromkeys(tensors, fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf_dtype = str(out_dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(dtype=hf_dtype), indent=2) + "\n")
