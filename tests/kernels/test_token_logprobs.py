"""token_logprobs (Triton under TRITON_INTERPRET=1, and the chunked PyTorch reference) vs float64.

Rule (flash-attention / CCE): the backend's max error against an fp64 ground truth is at most twice
the error of a plain same-dtype PyTorch implementation (full logits, autograd) plus a tiny floor.
Forward values and both gradients are checked; ignored rows must be exactly 0 with zero gradient.
"""

import importlib

import pytest
import torch

from singleturn.kernels.token_logprobs import token_logprobs, token_logprobs_and_entropy

# The module (its chunk-size knobs); the attribute `kernels.token_logprobs` is the exported function.
tlp = importlib.import_module("singleturn.kernels.token_logprobs")

BACKENDS = ["torch", "triton"]
# Without a GPU the Triton kernels run in the interpreter on CPU tensors (tests/conftest.py); with one,
# the same tests run the compiled kernels on CUDA tensors (bench/device_run.sh).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# (N, D, V): the unaligned shape, and one with D, V off every block size and N < BLOCK_N.
SHAPES = [(37, 48, 1003), (9, 72, 517)]


def naive_token_logprobs(hidden, weight, targets, temperature=1.0):
    """The baseline: full [N, V] logits in the input dtype, fp32 log-softmax, autograd backward."""
    z = (hidden @ weight.T).float() / temperature  # (N, V)
    logp = torch.log_softmax(z, dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets != -100, logp, 0.0)


def _make(N, D, V, dtype, seed=0, masked=(3,)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * D**-0.5 * 3).to(dtype)  # logits of O(3): peaked softmax
    targets = torch.randint(0, V, (N,), generator=g)
    for i in masked:
        if i < N:
            targets[i] = -100
    grad = torch.randn(N, generator=g)
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), grad.to(DEVICE)


def _run(fn, hidden, weight, targets, grad, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp = fn(h, w, targets, **kw)
    (logp * grad.to(logp.dtype)).sum().backward()
    return logp.detach(), h.grad, w.grad


def _assert_ratio(name, out, base, ref, floor=1e-6):
    err = (out.double() - ref).abs()
    base_err = (base.double() - ref).abs().max().item()
    tol = 2 * base_err + floor * (1 + ref.abs().max().item())
    worst = err.argmax().item()
    assert err.max().item() <= tol, (
        f"{name}: max err {err.max().item():.3e} at flat index {worst} > tol {tol:.3e} (baseline err {base_err:.3e})"
    )


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_fp64(backend, dtype, shape, temperature):
    hidden, weight, targets, grad = _make(*shape, dtype)
    ref = _run(
        naive_token_logprobs,
        hidden.double(),
        weight.double(),
        targets,
        grad.double(),
        temperature=temperature,
    )
    base = _run(naive_token_logprobs, hidden, weight, targets, grad, temperature=temperature)
    out = _run(token_logprobs, hidden, weight, targets, grad, temperature=temperature)
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype and out[2].dtype == dtype
    for name, o, b, r in zip(("logp", "d_hidden", "d_weight"), out, base, ref):
        _assert_ratio(f"{backend}/{name}", o, b, r)
    masked = targets == -100
    assert torch.all(out[0][masked] == 0) and torch.all(out[1][masked] == 0), "ignored rows must be exactly 0"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_chunked_backward_matches_fp64(backend, monkeypatch):
    # Force several vocab chunks (Triton: dh accumulates across chunks) / row chunks (torch).
    monkeypatch.setattr(tlp, "_TRITON_DLOGITS_BYTES", 37 * 4 * 256)
    monkeypatch.setattr(tlp, "_TORCH_CHUNK_BYTES", 1003 * 4 * 8)
    hidden, weight, targets, grad = _make(37, 48, 1003, torch.float32, seed=1)
    ref = _run(naive_token_logprobs, hidden.double(), weight.double(), targets, grad.double())
    base = _run(naive_token_logprobs, hidden, weight, targets, grad)
    out = _run(token_logprobs, hidden, weight, targets, grad)
    for name, o, b, r in zip(("logp", "d_hidden", "d_weight"), out, base, ref):
        _assert_ratio(f"{backend}/{name}", o, b, r)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_matches_fp64(backend, temperature):
    hidden, weight, targets, _ = _make(37, 48, 1003, torch.float32, seed=2)
    z = (hidden.double() @ weight.double().T) / temperature
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    ref = torch.where(targets != -100, ref, 0.0)
    base_z = (hidden @ weight.T) / temperature
    base = -(torch.softmax(base_z, -1) * torch.log_softmax(base_z, -1)).sum(-1)
    _, entropy = token_logprobs_and_entropy(
        hidden, weight, targets, temperature=temperature, compute_entropy=True
    )
    _assert_ratio(f"{backend}/entropy", entropy, torch.where(targets != -100, base, 0.0), ref)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_frozen_head_gets_no_gradient(backend):
    hidden, weight, targets, grad = _make(37, 48, 1003, torch.float32, seed=3)
    ref = _run(naive_token_logprobs, hidden.double(), weight.double(), targets, grad.double())
    base = _run(naive_token_logprobs, hidden, weight, targets, grad)
    h = hidden.clone().requires_grad_()
    (token_logprobs(h, weight, targets) * grad).sum().backward()  # weight.requires_grad is False
    assert weight.grad is None
    _assert_ratio(f"{backend}/d_hidden", h.grad, base[1], ref[1])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_all_rows_ignored_give_zero(backend):
    hidden, weight, targets, grad = _make(20, 32, 300, torch.float32)
    targets[:] = -100
    logp, d_hidden, d_weight = _run(token_logprobs, hidden, weight, targets, grad)
    assert torch.all(logp == 0) and torch.all(d_hidden == 0) and torch.all(d_weight == 0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_non_finite_hidden_is_reported_not_hidden(backend):
    hidden, weight, targets, _ = _make(20, 32, 300, torch.float32, masked=())
    hidden[5, 7] = float("nan")
    logp = token_logprobs(hidden, weight, targets)
    assert torch.isnan(logp[5]), "a NaN input row must surface as NaN, not be silently masked"
    assert torch.isfinite(torch.cat([logp[:5], logp[6:]])).all(), "other rows must be unaffected"


def test_rejects_bad_inputs():
    hidden, weight, targets, _ = (t.cpu() for t in _make(8, 16, 50, torch.float32))  # CUDA asserts async
    with pytest.raises(ValueError, match="targets out of"):
        token_logprobs(hidden, weight, torch.full_like(targets, 50))
    with pytest.raises(ValueError, match="hidden"):
        token_logprobs(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match="dtype"):
        token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)


def _peak_cpu_bytes(fn) -> int:
    """Peak live bytes of torch's CPU allocator during fn(): the profiler's signed alloc/free events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # + on allocation, - on free
        peak = max(peak, live)
    return peak


# Logits-sized buffers scale with N * V: the default case is small enough for 2 cores (full logits
# 125 MiB vs 16 MiB chunks); the slow one is the N=4096, D=256, V=32000 (500 MiB).
@pytest.mark.parametrize("N, D", [(1024, 16), pytest.param(4096, 256, marks=pytest.mark.slow)])
def test_torch_backend_memory_stays_far_below_full_logits(N, D, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    V = 32000
    hidden, weight, targets, grad = (t.cpu() for t in _make(N, D, V, torch.float32))
    hidden.requires_grad_()
    weight.requires_grad_()

    def step():
        (token_logprobs(hidden, weight, targets) * grad).sum().backward()

    peak = _peak_cpu_bytes(step)
    full_logits = N * V * 4
    grads = V * D * 4 + N * D * 4  # d_weight (its fp32 accumulator, for fp32 inputs) and d_hidden
    assert peak > grads, "the profiler saw fewer bytes than the gradients themselves: measurement broken"
    extra = peak - grads
    msg = f"extra peak {extra / 2**20:.0f} MiB, full logits {full_logits / 2**20:.0f} MiB"
    assert extra <= 5 * tlp._TORCH_CHUNK_BYTES, msg + ": not bounded by the chunk size"
    assert extra < full_logits / 3, msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(2048, 4096, 128256), (1000, 2048, 50257)], ids=str)
def test_gpu_triton_matches_fp64(shape, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    hidden, weight, targets, grad = _make(*shape, torch.bfloat16)
    ref = _run(naive_token_logprobs, hidden.double(), weight.double(), targets, grad.double())
    base = _run(naive_token_logprobs, hidden, weight, targets, grad)
    out = _run(token_logprobs, hidden, weight, targets, grad)
    for name, o, b, r in zip(("logp", "d_hidden", "d_weight"), out, base, ref):
        _assert_ratio(f"gpu/{name}", o, b, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_extra_memory_is_bounded(monkeypatch):
    # The H100 shape. Extra memory = the dlogits chunk + the fp32 d_hidden accumulator (the
    # price of exact, atomic-free accumulation over vocab chunks) + O(N) buffers; never O(N * V).
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    N, D, V = 8192, 4096, 128256
    hidden, weight, targets, grad = _make(N, D, V, torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.autograd.grad(token_logprobs(hidden, weight, targets), (hidden, weight), grad)  # autotune first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logp = token_logprobs(hidden, weight, targets)
    d_hidden, d_weight = torch.autograd.grad(logp, (hidden, weight), grad)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - (logp.nbytes + d_hidden.nbytes + d_weight.nbytes)
    bound = tlp._TRITON_DLOGITS_BYTES + N * D * 4 + 16 * 2**20
    assert extra <= bound, (
        f"extra {extra / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB (full logits: {N * V * 2 / 2**20:.0f} MiB)"
    )
