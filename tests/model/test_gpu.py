"""CUDA checks (run by bench/gpu_check.sh): flash-attn path vs SDPA, and generate on the GPU vs the CPU."""

import pytest
import torch

from model.generate import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_flash_attn_matches_sdpa(hf_pair, monkeypatch):
    import model.transformer as transformer

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
    from model.generate import score_continuations

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
