"""sample_tokens: the PyTorch reference's semantics and statistics, the dispatch, and (on a GPU) the
fused CUDA kernel in csrc/ against the reference.

CPU tests check the reference (the oracle) itself: truncation sets with ties, greedy, the log-prob of
the drawn token, a chi-square of its draws against the truncated softmax, reproducibility, and that
`sample_tokens` on CPU is the reference whatever KERNELS_BACKEND says. GPU tests (marked gpu; run by
bench/device_run.sh) check the CUDA op: chi-square over 10^6 draws, log-probs equal to the reference to
1e-5, same seed same tokens, tokens equal to the reference's, fp32 and bf16, V = 128256 and odd V.
The host-side C++ check of the kernel's per-row logic is in tests/csrc/test_csrc.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from singleturn.kernels import _csrc
from singleturn.kernels.sampling import (
    _as_int64,
    philox_uniform,
    sample_tokens,
    sample_tokens_reference,
    truncation_mask,
)


def _truncated_probs(logits: torch.Tensor, T: float, top_p: float, top_k: int) -> torch.Tensor:
    """float64 [B, V]: the distribution `sample_tokens` draws from (reference definition)."""
    probs = torch.softmax(logits.float() / T, dim=-1)
    keep = truncation_mask(probs, top_k, top_p)
    kept = torch.where(keep, probs, 0.0).double()
    return kept / kept.sum(-1, keepdim=True)


def _chi_square_ok(tokens: torch.Tensor, p: torch.Tensor) -> tuple[bool, str]:
    """Pearson chi-square of token counts vs. p (1-D); bins with expected count < 5 are pooled."""
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=p.numel()).double()
    expected = p.cpu() * n
    assert counts[expected == 0].sum() == 0, "drew a token with zero probability"
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (expected > 0)].sum()[None]])
    exp = torch.cat([expected[big], expected[~big & (expected > 0)].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    df = obs.numel() - 1
    # Wilson-Hilferty upper quantile at z = 4.26 (p ~ 1e-5): a seeded test that fails means a real bias.
    crit = df * (1 - 2 / (9 * df) + 4.26 * math.sqrt(2 / (9 * df))) ** 3 if df > 0 else 0.0
    return stat <= crit, f"chi2 = {stat:.1f} > {crit:.1f} (df = {df}, n = {n})"


# ---------------------------------------------------------------- reference (CPU)


def test_truncation_keeps_ties_at_the_boundary():
    probs = torch.softmax(torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]]), -1)
    assert truncation_mask(probs, 2, 1.0).tolist() == [[True, True, True, True, False]]
    # top-p: the arg-max alone has < 0.9 of the mass, so the tied group at 1.0 joins it whole.
    assert truncation_mask(probs, 0, 0.9).tolist() == [[True, True, True, True, False]]
    assert truncation_mask(probs, 0, 0.01).tolist() == [[True, False, False, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_first_argmax(dtype):
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 0.0]], dtype=dtype)
    tokens, logp = sample_tokens(logits, temperature=0.0)
    assert tokens.tolist() == [1, 0] and logp.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("T", "top_p", "top_k"), [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.8, 20), (1.0, 1.0, 5)]
)
@pytest.mark.parametrize("V", [37, 1003])
def test_reference_logprob_is_the_truncated_logprob(T, top_p, top_k, V):
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(V)) * 2
    tokens, logp = sample_tokens_reference(logits, temperature=T, top_p=top_p, top_k=top_k, seed=1)
    p = _truncated_probs(logits, T, top_p, top_k)
    want = p.gather(-1, tokens[:, None])[:, 0].log().float()
    assert (p.gather(-1, tokens[:, None]) > 0).all(), "drew a truncated token"
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("T", "top_p", "top_k"), [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 0.8, 6)])
def test_reference_draws_follow_the_truncated_softmax(T, top_p, top_k):
    logits = torch.randn(1, 37, generator=torch.Generator().manual_seed(0)) * 1.5
    tokens, _ = sample_tokens_reference(
        logits.expand(20_000, 37), temperature=T, top_p=top_p, top_k=top_k, seed=7
    )
    ok, msg = _chi_square_ok(tokens, _truncated_probs(logits, T, top_p, top_k)[0])
    assert ok, msg


def test_reference_is_reproducible_from_seed_and_offset():
    logits = torch.randn(256, 1003, generator=torch.Generator().manual_seed(1))
    a = sample_tokens_reference(logits, seed=3, offset=10)[0]
    assert torch.equal(a, sample_tokens_reference(logits, seed=3, offset=10)[0])
    assert not torch.equal(a, sample_tokens_reference(logits, seed=3, offset=11)[0])
    assert not torch.equal(a, sample_tokens_reference(logits, seed=4, offset=10)[0])


@pytest.mark.parametrize(("T", "top_p", "top_k"), [(0.7, 0.9, 5), (1.0, 1.0, 0), (0.0, 1.0, 0)])
def test_reference_keeps_every_tensor_on_the_logits_device(T, top_p, top_k):
    # meta tensors raise on any CPU tensor mixed in, which is the bug a CUDA run of the reference would hit.
    tokens, logp = sample_tokens_reference(
        torch.empty(4, 37, device="meta"), temperature=T, top_p=top_p, top_k=top_k
    )
    assert tokens.device.type == "meta" and tokens.shape == (4,) and logp.dtype == torch.float32


def test_philox_uniforms_are_uniform():
    u = philox_uniform(seed=123, offset=0, rows=100_000)
    assert 0.0 < u.min() and u.max() < 1.0
    hist = torch.histc(u.float(), bins=20, min=0.0, max=1.0)
    stat = ((hist - 5000.0) ** 2 / 5000.0).sum().item()
    assert stat < 60.0, f"chi2 = {stat:.1f} over 20 bins"  # df = 19: p ~ 4e-6


# ---------------------------------------------------------------- dispatch (CPU)


@pytest.mark.parametrize("backend", ["", "torch", "triton", "cuda"])
def test_sample_tokens_on_cpu_is_the_reference(monkeypatch, backend):
    monkeypatch.setenv("KERNELS_BACKEND", backend)
    logits = torch.randn(8, 1003, generator=torch.Generator().manual_seed(2))
    got = sample_tokens(logits, temperature=0.8, top_p=0.9, top_k=50, seed=5, offset=2)
    want = sample_tokens_reference(logits, temperature=0.8, top_p=0.9, top_k=50, seed=5, offset=2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_tokens(torch.zeros(2, 5), **kwargs)


def test_seed_and_offset_pass_as_int64_twos_complement():
    for v in (0, 1, 2**63 - 1, 2**63, 2**64 - 1, -1, 2**70 + 3):
        s = _as_int64(v)
        assert -(2**63) <= s < 2**63 and s % 2**64 == v % 2**64


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("SINGLETURN_RL_PREBUILT", raising=False)  # the build path, not a prebuilt library
    monkeypatch.setattr(_csrc, "_state", {"tried": False, "loaded": False, "fake": _csrc._state["fake"]})
    monkeypatch.setattr(_csrc, "op_registered", lambda name="sample_tokens": False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken_build():
        raise RuntimeError("nvcc exploded")

    monkeypatch.setattr(_csrc, "_build_and_load", broken_build)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _csrc.load() is False and _csrc.load() is False
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "nvcc exploded" in messages[0] and "PyTorch reference" in messages[0], (
        messages
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_no_build_attempt_without_cuda():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _csrc.load() is False or _csrc.op_registered()


@pytest.mark.slow
def test_bench_quick_smoke(tmp_path):
    bench = Path(__file__).resolve().parents[2] / "bench" / "bench_sampling.py"
    proc = subprocess.run(
        [sys.executable, str(bench), "--quick", "--out-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "sampling.jsonl").read_text().splitlines()]
    assert rows and all(r["ms_median"] > 0 and r["V"] == 128256 and r["git_sha"] for r in rows), rows
    assert "| provider |" in (tmp_path / "sampling.md").read_text()


# ---------------------------------------------------------------- CUDA kernel (GPU)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_op():
    if not _csrc.load():
        pytest.fail("the CUDA extension in csrc/ did not build or load (see the warning above)")
    return torch.ops.singleturn_rl.sample_tokens


GPU_CONFIGS = [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 1.0, 50), (1.2, 0.8, 40)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("T", "top_p", "top_k"), GPU_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_chi_square_over_a_million_draws(cuda_op, T, top_p, top_k, dtype):
    V, B, calls = 1003, 1 << 16, 16  # 2^20 draws of one row
    logits = (torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 2).to(dtype).cuda()
    rows = logits.expand(B, V).contiguous()
    tokens = torch.cat([cuda_op(rows, T, top_p, top_k, 11, c)[0] for c in range(calls)])
    ok, msg = _chi_square_ok(tokens, _truncated_probs(logits.cpu(), T, top_p, top_k)[0])
    assert ok, msg


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("T", "top_p", "top_k"), [*GPU_CONFIGS, (0.0, 1.0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "V"), [(64, 128256), (33, 1003), (7, 32001)])
def test_cuda_matches_reference(cuda_op, T, top_p, top_k, dtype, B, V):
    g = torch.Generator().manual_seed(B * V)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype).cuda()
    tokens, logp = cuda_op(logits, T, top_p, top_k, 5, 9)
    ref_tokens, ref_logp = sample_tokens_reference(
        logits, temperature=T, top_p=top_p, top_k=top_k, seed=5, offset=9
    )
    # Same draw up to float round-off at a CDF step (probability ~1e-7 per row).
    bad = (tokens != ref_tokens).nonzero().flatten().tolist()
    assert len(bad) <= max(1, B // 1000), f"tokens differ at rows {bad}"
    if T > 0:
        # The returned log-prob of the drawn token equals the reference's log-prob of that same token.
        p = _truncated_probs(logits, T, top_p, top_k)  # on the GPU: the reference is device-clean
        want = p.gather(-1, tokens[:, None])[:, 0].log().float()
        torch.testing.assert_close(logp, want, atol=1e-5, rtol=0)
    ok = ~torch.isin(
        torch.arange(B, device=tokens.device), torch.tensor(bad, device=tokens.device, dtype=torch.long)
    )
    torch.testing.assert_close(logp[ok], ref_logp[ok], atol=1e-5, rtol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_same_seed_same_tokens(cuda_op, dtype):
    logits = torch.randn(256, 128256, device="cuda").to(dtype)
    a = cuda_op(logits, 1.0, 0.95, 0, 1234, 7)
    b = cuda_op(logits, 1.0, 0.95, 0, 1234, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], cuda_op(logits, 1.0, 0.95, 0, 1234, 8)[0])


@pytest.mark.gpu
@gpu
def test_cuda_dispatch_and_unaligned_rows(cuda_op, monkeypatch):
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    base = torch.randn(16, 1004, device="cuda")
    logits = base[:, 1:]  # non-contiguous, odd V: the binding makes it contiguous, rows unaligned
    got = sample_tokens(logits, temperature=0.9, top_p=0.9, seed=3)
    want = sample_tokens_reference(logits, temperature=0.9, top_p=0.9, seed=3)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
