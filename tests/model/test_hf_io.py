"""HF checkpoint I/O: load what save_pretrained wrote, save what from_pretrained loads, refuse bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from singleturn.model.config import LlamaConfig
from singleturn.model.hf_io import load_hf_checkpoint, save_hf_checkpoint

TOKENS = torch.randint(0, 1003, (2, 23), generator=torch.Generator().manual_seed(0))


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single", "sharded"])
def test_load_hf_save_pretrained(tmp_path, hf_pair, tie, shard):
    hf, _ = hf_pair(seed=1, tie=tie, n_kv_heads=1)
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    model, cfg = load_hf_checkpoint(tmp_path)
    assert cfg.tie_word_embeddings == tie and cfg.n_kv_heads == 1 and cfg.rope_scaling is not None
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    assert not any(p.is_meta for p in model.parameters()) and not model.inv_freq.is_meta
    with torch.no_grad():
        err = _max_err(model(TOKENS), hf(TOKENS).logits)
    assert err <= 1e-5, f"logit error {err:.3e} after loading HF's save_pretrained"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("max_shard_bytes", [None, 60_000], ids=["single", "sharded"])
def test_save_loads_in_hf(tmp_path, hf_pair, tie, max_shard_bytes):
    from transformers import LlamaForCausalLM

    _, ours = hf_pair(seed=2, tie=tie)
    save_hf_checkpoint(ours, tmp_path, max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_bytes:
        assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == shards
    else:
        assert shards == ["model.safetensors"]
    stored = {k for s in shards for k in load_file(tmp_path / s)}
    assert ("lm_head.weight" in stored) == (not tie)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        err = _max_err(hf(TOKENS).logits, ours(TOKENS))
    assert err <= 1e-5, f"HF logits differ by {err:.3e} after loading our checkpoint"
    # And back into ours: identical weights.
    again, cfg = load_hf_checkpoint(tmp_path)
    assert cfg == ours.config
    for (name, p), (_, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name


def test_save_bf16_and_load_with_dtype(tmp_path, hf_pair):
    _, ours = hf_pair(seed=3)
    save_hf_checkpoint(ours, tmp_path / "a", max_shard_bytes=50_000)
    save_hf_checkpoint(ours, tmp_path / "a", dtype=torch.bfloat16)  # re-save: stale shards removed
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _ = load_hf_checkpoint(tmp_path / "a")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model32, _ = load_hf_checkpoint(tmp_path / "a", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    ref = ours.layers[0].attention.wq.weight
    assert torch.equal(model32.layers[0].attention.wq.weight, ref.bfloat16().float())


@pytest.mark.parametrize("max_shard_bytes", [None, 50_000], ids=["single", "sharded"])
def test_saved_weights_are_readable_by_others(tmp_path, hf_pair, max_shard_bytes):
    """final/model.safetensors was written 0600 (safetensors' default), the converter's 0644."""
    _, ours = hf_pair(seed=5)
    save_hf_checkpoint(ours, tmp_path, max_shard_bytes=max_shard_bytes)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.glob("*.safetensors")}
    assert modes and set(modes.values()) == {"0o644"}, modes


# ---- bad input: each error names the problem -------------------------------------------------


@pytest.fixture
def saved(tmp_path, hf_pair):
    _, ours = hf_pair(seed=4)
    save_hf_checkpoint(ours, tmp_path)
    return tmp_path


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(saved)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(saved)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|unreadable)"):
        load_hf_checkpoint(saved)


def test_wrong_shape_tensor(saved):
    f = saved / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(159, 64)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors.*\(159, 64\)"
    ):
        load_hf_checkpoint(saved)


def test_missing_and_unexpected_tensor(saved):
    f = saved / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_hf_checkpoint(saved)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected.*q_proj\.bias.*model\.safetensors"):
        load_hf_checkpoint(saved)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.*yarn"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling.*linear"),
        ("attention_bias", True, "attention_bias"),
        ("mlp_bias", True, "mlp_bias"),
        ("hidden_act", "gelu", "hidden_act"),
        ("head_dim", 32, "head_dim"),
        ("model_type", "mistral", "model_type"),
    ],
)
def test_unsupported_config(saved, key, value, match):
    cfg = json.loads((saved / "config.json").read_text())
    cfg[key] = value
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_hf_checkpoint(saved)


def test_config_round_trip_and_presets():
    for name in ["tiny", "llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.1-70b"]:
        cfg = LlamaConfig.from_preset(name)
        assert LlamaConfig.from_hf(cfg.to_hf_dict()) == cfg, name
    assert LlamaConfig.preset("tiny") == LlamaConfig.from_preset("tiny")
    assert LlamaConfig.from_preset("llama3.1-8b").rope_scaling.factor == 8.0
    with pytest.raises(ValueError, match="unknown model preset"):
        LlamaConfig.from_preset("llama2")
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig.from_preset("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="dim"):
        LlamaConfig.from_preset("tiny", dim=250)
