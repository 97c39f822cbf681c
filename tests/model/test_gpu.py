"""CUDA checks (run by bench/device_run.sh): our model vs transformers in bf16 on the GPU (the 2x rule),
flash-attn path vs SDPA, generate on the GPU vs the CPU, and FlexAttention (packed rows, model/masks.py)
vs the dense SDPA mask."""

import copy
import random

import pytest
import torch

from singleturn.model.generate import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("seq", [37, 300])
def test_bf16_on_cuda_error_at_most_twice_hf(hf_pair, seq):
    """Both models in bf16 on the GPU (SDPA picks its fused kernels there), against HF in float64: our
    error is at most twice HF's own plus a small floor."""
    hf, ours = hf_pair(seed=3, n_kv_heads=2, tie=False, rope_scaling=True)
    tokens = torch.randint(0, 1003, (3, seq), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        ref = copy.deepcopy(hf).double().cuda()(tokens).logits
        hf_err = (
            (copy.deepcopy(hf).to(torch.bfloat16).cuda()(tokens).logits.double() - ref).abs().max().item()
        )
        out = copy.deepcopy(ours).to(torch.bfloat16).cuda()(tokens)
    assert out.dtype == torch.bfloat16 and out.is_cuda
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * hf_err + 1e-3, f"bf16 error {err:.3e} > 2 x HF's {hf_err:.3e} + 1e-3"


def test_flash_attn_matches_sdpa(hf_pair, monkeypatch):
    import singleturn.model.transformer as transformer

    if transformer.flash_attn_func is None:
        pytest.skip("flash-attn is not installed")
    hf, ours = hf_pair(seed=0, n_kv_heads=2)
    tokens = torch.randint(0, 1003, (2, 37), generator=torch.Generator().manual_seed(0)).cuda()
    ours = ours.cuda()
    with torch.no_grad():
        ref = ours(tokens).double()  # fp32: SDPA (flash-attn needs fp16/bf16)
        ours = ours.to(torch.bfloat16)
        flash = ours(tokens).double()
        monkeypatch.setattr(transformer, "flash_attn_func", None)
        sdpa = ours(tokens).double()
    err_flash, err_sdpa = (flash - ref).abs().max().item(), (sdpa - ref).abs().max().item()
    assert err_flash <= 2 * err_sdpa + 1e-3, f"flash-attn error {err_flash:.3e} vs SDPA bf16 {err_sdpa:.3e}"


def test_generate_cuda_matches_cpu(hf_pair):
    _, ours = hf_pair(seed=1, n_kv_heads=1)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    kw = dict(num_samples=2, max_new_tokens=10, temperature=0.0, stop_ids=(2,))
    cpu = generate(ours, prompts, **kw)
    gpu = generate(ours.cuda(), prompts, **kw)
    assert gpu.tokens.is_cuda
    assert torch.equal(gpu.tokens.cpu(), cpu.tokens) and torch.equal(gpu.lengths.cpu(), cpu.lengths)


def test_score_continuations_cuda_matches_cpu(hf_pair):
    """Tree attention (a bool mask through SDPA) on the GPU, fp32 and bf16, against the CPU fp32 scores."""
    from singleturn.model.generate import score_continuations

    _, ours = hf_pair(seed=2, n_kv_heads=1)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    conts = [[[20, 21, 2], [22, 2]], [[23, 2], [24, 25, 26, 2], [27, 2]], [[28, 2]]]
    cpu = score_continuations(ours, prompts, conts)
    ours = ours.cuda()
    # bf16: the same model in bf16 on the CPU is off by at most 0.057 (4 seeds); 0.15 leaves room for kernels.
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.15)):
        got = score_continuations(ours.to(dtype), prompts, conts)
        for g_row, c_row in zip(got, cpu):
            assert max(abs(g - c) for g, c in zip(g_row, c_row)) <= tol, (dtype, g_row, c_row)


def _flex_case():
    """Shared-prefix rows longer than one 128 block: several groups per row, padding, full tiles."""
    from singleturn.model.masks import build_shared_prefix_batch

    rng = random.Random(0)
    groups = [
        (
            [rng.randrange(3, 1003) for _ in range(P)],
            [[rng.randrange(3, 1003)] * rng.randint(1, 9) for _ in range(G)],
        )
        for P, G in [(300, 3), (90, 5), (37, 8), (140, 1)]
    ]
    (mb,) = build_shared_prefix_batch(groups, max_tokens=4096, row_len=400, device="cuda")
    return mb


def _logp_and_grads(model, mb, attn_mask, loss_w):
    from singleturn.kernels.token_logprobs import token_logprobs

    h = model.hidden(mb.tokens, positions=mb.positions, attn_mask=attn_mask)  # (B, T, D)
    h_N = h[mb.rows, mb.cols]
    if h_N.dtype == torch.float64:  # the fused op takes fp32/bf16/fp16
        logp = model.output(h_N).log_softmax(-1).gather(1, mb.targets[:, None])[:, 0]
    else:
        logp = token_logprobs(h_N, model.output.weight, mb.targets)
    (logp.double() * loss_w).sum().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logp.detach().double(), grads


def test_flex_attention_matches_dense_sdpa(hf_pair):
    """A SegmentMask on CUDA runs compiled FlexAttention; log-probs and gradients, fp32 and bf16, against
    fp64 (dense SDPA): FlexAttention's error at most twice the dense bool-mask SDPA's in the same dtype."""
    from torch.nn.attention.flex_attention import BlockMask

    _, ours = hf_pair(seed=3, n_kv_heads=2)
    mb = _flex_case()
    assert mb.tokens.shape[0] == 2 and mb.tokens.shape[1] > 128
    block_mask = mb.mask.for_attention("cuda")
    assert isinstance(block_mask, BlockMask) and int(block_mask.full_kv_num_blocks.sum()) > 0
    loss_w = torch.randn(
        mb.num_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    ).cuda()
    truth, g_truth = _logp_and_grads(copy.deepcopy(ours).double().cuda(), mb, mb.mask.dense(), loss_w)
    for dtype, floor in ((torch.float32, 1e-6), (torch.bfloat16, 1e-3)):
        model = copy.deepcopy(ours).to(dtype).cuda()
        flex, g_flex = _logp_and_grads(model, mb, mb.mask, loss_w)  # -> FlexAttention
        dense, g_dense = _logp_and_grads(model, mb, mb.mask.dense(), loss_w)  # -> SDPA
        e_flex, e_dense = (flex - truth).abs().max().item(), (dense - truth).abs().max().item()
        assert e_flex <= 2 * e_dense + floor, (
            f"{dtype} log-prob error: flex {e_flex:.3e}, dense {e_dense:.3e}"
        )
        for name, g in g_truth.items():
            scale = g.abs().max().item()
            e_f, e_d = (g_flex[name] - g).abs().max().item(), (g_dense[name] - g).abs().max().item()
            assert e_f <= 2 * e_d + floor * scale, (
                f"{dtype} {name}: grad error flex {e_f:.3e}, dense {e_d:.3e}"
            )


def test_flex_attention_new_mask_same_shape_does_not_recompile(hf_pair):
    """Every micro-batch brings a new BlockMask (new ids captured by its mask_mod): same shapes, no recompile."""
    import torch._dynamo

    from singleturn.model.masks import build_shared_prefix_batch

    _, ours = hf_pair(seed=4, n_kv_heads=2)
    ours = ours.cuda()
    rng = random.Random(1)

    def batch(spec):
        groups = [([rng.randrange(3, 1003) for _ in range(P)], [[5] * n for n in ns]) for P, ns in spec]
        (mb,) = build_shared_prefix_batch(groups, max_tokens=4096, pad_to=128, device="cuda")
        return mb

    a, b = batch([(200, [3, 4, 5]), (150, [2, 9])]), batch([(60, [1] * 8), (280, [7, 7])])
    assert a.tokens.shape == b.tokens.shape == (1, 384) and not torch.equal(a.mask.segment, b.mask.segment)
    for mb, strict in ((a, False), (b, True)):
        with torch._dynamo.config.patch(error_on_recompile=strict):
            h = ours.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask)
            h.sum().backward()
        dense = ours.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask.dense())
        assert (h - dense).abs().max().item() <= 1e-4
