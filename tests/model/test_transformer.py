"""Transformer vs transformers.LlamaForCausalLM on random tiny configs: logits and gradients.

fp32: max abs logit error <= 1e-5. bf16: our error against the fp32 reference is at most twice HF's
own bf16-vs-fp32 error plus a small floor (the flash-attention test rule).
"""

import pytest
import torch

from singleturn.model.config import LlamaConfig
from singleturn.model.transformer import Transformer, rope_inv_freq

CASES = [
    dict(n_kv_heads=1, tie=False, rope_scaling=True, vocab_size=1003),
    dict(n_kv_heads=2, tie=True, rope_scaling=True, vocab_size=1003),
    dict(n_kv_heads=4, tie=False, rope_scaling=False, vocab_size=512),
    dict(n_kv_heads=2, tie=False, rope_scaling=False, vocab_size=1003),
]


def _ids(case):
    return f"kv{case['n_kv_heads']}-{'tied' if case['tie'] else 'untied'}-{'llama3' if case['rope_scaling'] else 'rope'}-V{case['vocab_size']}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fp32_logits_match_hf(hf_pair, case):
    hf, ours = hf_pair(**case)
    tokens = torch.randint(0, case["vocab_size"], (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = ours(tokens)
    assert out.shape == (3, 37, case["vocab_size"]) and out.dtype == torch.float32
    err = (out - ref).abs().max().item()
    assert err <= 1e-5, f"max abs logit error {err:.3e} > 1e-5"
    h = ours.hidden(tokens)
    assert h.shape == (3, 37, 64)
    torch.testing.assert_close(ours.output(h), out, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES[:2], ids=_ids)
def test_fp32_gradients_match_hf(hf_pair, case):
    hf, ours = hf_pair(**case)
    tokens = torch.randint(0, case["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, case["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(3))
    loss_fn = torch.nn.functional.cross_entropy
    loss_fn(hf(tokens).logits.flatten(0, 1), targets.flatten()).backward()
    loss_fn(ours(tokens).flatten(0, 1), targets.flatten()).backward()
    from singleturn.model.hf_io import hf_to_ours

    ours_params = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        g_ref, g = p.grad, ours_params[hf_to_ours(name)].grad
        scale = g_ref.abs().max().item()
        err = (g - g_ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, scale), f"{name}: grad error {err:.3e} (grad max {scale:.3e})"


@pytest.mark.parametrize("case", CASES[:2], ids=_ids)
def test_bf16_error_at_most_twice_hf(hf_pair, case):
    hf, ours = hf_pair(**case)
    tokens = torch.randint(0, case["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(tokens).logits.double()
        hf_err = (hf.to(torch.bfloat16)(tokens).logits.double() - ref).abs().max().item()
        out = ours.to(torch.bfloat16)(tokens)
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * hf_err + 1e-3, f"bf16 error {err:.3e} > 2 x HF's {hf_err:.3e} + 1e-3"


@pytest.mark.parametrize("head_dim,old_ctx", [(16, 16), (64, 8192), (128, 8192)])
def test_llama3_inv_freq_matches_hf(head_dim, old_ctx):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
    hfc = HFLlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(rope, original_max_position_embeddings=old_ctx),
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hfc)
    cfg = LlamaConfig.from_hf(hfc.to_dict())
    ours = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_meta_construction_then_init():
    cfg = LlamaConfig.from_preset("tiny", n_layers=2)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.tok_embeddings.weight.is_meta
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_buffers("cpu")
    model.init_weights(seed=3)
    assert model.output.weight is model.tok_embeddings.weight
    ref = Transformer(cfg)
    ref.init_weights(seed=3)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(model.inv_freq, ref.inv_freq)
    assert torch.all(model.norm.weight == 1)
    std = model.layers[0].attention.wq.weight.std().item()
    assert abs(std - 0.02) < 2e-3, std
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    torch.testing.assert_close(model(tokens), ref(tokens), rtol=0, atol=0)


def test_param_count_presets():
    # Meta-device build (no memory): counts of the released checkpoints.
    expected = {
        "smollm2-135m": 134_515_008,  # HF SmolLM2-135M-Instruct: 134.5M (tied head)
        "llama3.2-1b": 1_235_814_400,
        "llama3.2-3b": 3_212_749_824,
        "llama3.1-8b": 8_030_261_248,
    }
    for name, n in expected.items():
        with torch.device("meta"):
            model = Transformer(LlamaConfig.from_preset(name))
        assert sum(p.numel() for p in model.parameters()) == n, name
    with torch.device("meta"):
        tiny = Transformer(LlamaConfig.from_preset("tiny"))
    assert 1e6 < sum(p.numel() for p in tiny.parameters()) < 2e7


def test_inv_freq_bands():
    from singleturn.model.config import RopeScaling

    plain = rope_inv_freq(16, 10000.0, None)
    scaled = rope_inv_freq(16, 10000.0, RopeScaling(factor=8.0, original_max_position_embeddings=32))
    assert torch.equal(scaled[:1], plain[:1])  # shortest wavelength untouched
    torch.testing.assert_close(scaled[-1:], plain[-1:] / 8.0)  # longest divided by factor
    # wavelengths 2*pi*10000**(i/8): 6.3 (kept, < 32/4), 19.9 (smoothed), 62.8 and up (scaled, > 32/1)
    assert plain[1] / 8.0 < scaled[1] < plain[1]
    torch.testing.assert_close(scaled[2:], plain[2:] / 8.0)


def test_hidden_takes_a_segment_mask_or_its_dense_tensor(hf_pair):
    """`hidden(..., attn_mask=SegmentMask)` is the dense bool path on CPU, bit for bit; one packed
    causal example is the plain causal forward."""
    from singleturn.model.masks import build_packed_causal_batch, build_shared_prefix_batch

    _, ours = hf_pair(seed=7, n_kv_heads=2)
    groups = [([5, 6, 7, 8, 9, 10, 11], [[20, 21, 22], [23], [24, 25]]), ([12, 13], [[26, 27]])]
    (mb,) = build_shared_prefix_batch(groups, max_tokens=64, row_len=12)
    with torch.no_grad():
        a = ours.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask)
        b = ours.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask.dense())
        assert torch.equal(a, b)
        (one,) = build_packed_causal_batch([(list(range(3, 40)), [40, 41])], max_tokens=64)
        packed = ours.hidden(one.tokens, positions=one.positions, attn_mask=one.mask)
        plain = ours.hidden(one.tokens)
    err = (packed - plain).abs().max().item()
    assert err <= 1e-5, f"one packed causal example vs the causal forward: {err:.3e}"


def test_rmsnorm_fp64_stays_fp64():
    from singleturn.model.transformer import RMSNorm

    norm = RMSNorm(37).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 37, dtype=torch.float64) * 1e3
    want = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    assert (norm(x) - want).abs().max().item() <= 1e-12 * want.abs().max().item()
    x32 = x.float()  # fp32 and bf16 inputs: unchanged numerics (the statistics in fp32)
    assert torch.equal(RMSNorm(37)(x32), x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5))
