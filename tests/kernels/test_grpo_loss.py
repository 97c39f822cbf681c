"""grpo_loss (Triton under TRITON_INTERPRET=1, and the PyTorch reference) vs a float64 ground truth.

The ground truth is full fp64 logits + the surrogate written out in fp64; the baseline for the error
ratio is the same computation in the input dtype (full logits). Checked: the summed loss, d_hidden,
d_weight, every statistic, ignored rows, zero advantages, the log-ratio clamp, non-finite inputs.
"""

import pytest
import torch

from singleturn.kernels.grpo_loss import LOG_RATIO_CLAMP, GRPOLossOutput, grpo_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", request.param)
    return request.param


def _plain_grpo(hidden, weight, targets, adv, old, ref, kl_coef, lo, hi, temperature):
    """Plain PyTorch in the inputs' dtype (full [N, V] logits): the baseline and, in fp64, the truth."""
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = (hidden @ weight.T).to(dt) / temperature
    valid = targets != -100
    logp = torch.log_softmax(z, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    ratio = torch.exp(torch.clamp(logp - old.to(dt), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    a = adv.to(dt)
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - lo, 1 + hi) * a
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref is not None:
        y = torch.clamp(ref.to(dt) - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(y) - y - 1
        per_token = per_token + kl_coef * kl
    p = torch.softmax(z, -1)
    entropy = -(p * torch.log_softmax(z, -1)).sum(-1)
    zero = torch.zeros_like(logp)
    return GRPOLossOutput(
        loss=torch.where(valid, per_token, zero).sum(),
        clip_count=(valid & (clipped < unclipped)).sum().to(dt),
        ratio=torch.where(valid, ratio, zero).sum().detach(),
        kl=torch.where(valid, kl, zero).sum().detach(),
        entropy=torch.where(valid, entropy, zero).sum().detach(),
        num_tokens=valid.sum(),
    )


def _logp(hidden, weight, targets, temperature):
    z = (hidden @ weight.T).to(torch.float64) / temperature
    return torch.log_softmax(z, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1).detach()


def _make(N, D, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) * D**-0.5 * 3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 17]] = -100
    with torch.no_grad():
        true_logp = (
            torch.log_softmax(hidden @ weight.T, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
        )
    old = true_logp + 0.3 * torch.randn(N, generator=g)  # ratios spread across both clip edges
    ref = true_logp + 0.2 * torch.randn(N, generator=g)
    seq_adv = torch.randn(4, generator=g)
    adv = seq_adv.repeat_interleave(-(-N // 4))[:N]  # per-sequence advantage broadcast to its tokens
    return [t.to(DEVICE) for t in (hidden.to(dtype), weight.to(dtype), targets, adv, old, ref)]


def _run(fn, hidden, weight, *args, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, *args, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def _assert_ratio(name, out, base, ref, floor=1e-6):
    err = (out.double() - ref.double()).abs().max().item()
    base_err = (base.double() - ref.double()).abs().max().item()
    tol = 2 * base_err + floor * (1 + ref.double().abs().max().item())
    assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e} (baseline err {base_err:.3e})"


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kl_coef, temperature", [(0.0, 1.0), (0.1, 0.7)])
def test_matches_fp64(backend, dtype, kl_coef, temperature):
    hidden, weight, targets, adv, old, ref = _make(37, 48, 1003, dtype)
    ref_arg = ref if kl_coef > 0 else None
    kw = dict(kl_coef=kl_coef, lo=0.2, hi=0.28, temperature=temperature)
    truth = _run(_plain_grpo, hidden.double(), weight.double(), targets, adv, old, ref_arg, **kw)
    base = _run(_plain_grpo, hidden, weight, targets, adv, old, ref_arg, **kw)
    out = _run(
        grpo_loss,
        hidden,
        weight,
        targets,
        adv,
        old,
        ref_logp=ref_arg,
        kl_coef=kl_coef,
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        temperature=temperature,
        compute_entropy=True,
    )
    for name, o, b, t in zip(("d_hidden", "d_weight"), out[1:], base[1:], truth[1:]):
        _assert_ratio(f"{backend}/{name}", o, b, t)
    for field in ("loss", "ratio", "kl", "entropy"):
        _assert_ratio(
            f"{backend}/{field}", getattr(out[0], field), getattr(base[0], field), getattr(truth[0], field)
        )
    # A token whose true ratio sits within the baseline's log-prob error of a clip edge may flip.
    margin = (
        2
        * (
            _logp(hidden, weight, targets, temperature)
            - _logp(hidden.double(), weight.double(), targets, temperature)
        )
        .abs()
        .max()
    )
    x = _logp(hidden.double(), weight.double(), targets, temperature) - old.double()
    edges = torch.tensor([0.8, 1.28], dtype=torch.float64, device=x.device).log()
    ambiguous = ((x[:, None] - edges).abs() <= margin).any(1) & (targets != -100)
    assert truth[0].clip_count.item() > 0, "the data must exercise clipping"
    assert abs(out[0].clip_count.item() - truth[0].clip_count.item()) <= ambiguous.sum().item(), (
        "clipped-token counts differ"
    )
    assert out[0].num_tokens.item() == 35
    assert not any(t.requires_grad for t in (out[0].clip_count, out[0].ratio, out[0].kl, out[0].entropy))
    assert torch.all(out[1][targets == -100] == 0), "ignored rows must get exactly zero gradient"


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_zero_advantages_give_zero_loss_and_grads(backend):
    hidden, weight, targets, adv, old, _ = _make(20, 32, 300, torch.float32)
    out, d_hidden, d_weight = _run(grpo_loss, hidden, weight, targets, torch.zeros_like(adv), old)
    assert out.loss.item() == 0 and torch.all(d_hidden == 0) and torch.all(d_weight == 0)
    assert out.entropy is None and out.kl.item() == 0


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_log_ratio_is_clamped_before_exp(backend):
    hidden, weight, targets, adv, old, ref = _make(20, 32, 300, torch.float32)
    old[:5] = -1e4  # ratio would overflow to inf without the clamp
    ref[5:10] = 1e4  # k3's exp(ref - logp) likewise
    out, d_hidden, _ = _run(
        grpo_loss, hidden, weight, targets, -adv.abs() - 0.1, old, ref_logp=ref, kl_coef=0.1
    )
    assert torch.isfinite(out.loss) and torch.isfinite(d_hidden).all()
    clamped = (targets[:5] != -100).sum().item()  # row 2 is ignored
    assert out.ratio.item() >= clamped * torch.exp(torch.tensor(LOG_RATIO_CLAMP)).item() * 0.999


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_non_finite_inputs_are_rejected(backend):
    hidden, weight, targets, adv, old, _ = _make(20, 32, 300, torch.float32)
    # A non-finite input on CUDA is a device assert (async, it ends the process's CUDA context), so the
    # rejection is checked on CPU tensors: the interpreter's triton path on a CPU machine, the torch path
    # elsewhere. On a CUDA machine the compiled kernel runs the part that must NOT raise, on the device.
    compiled = backend == "triton" and torch.cuda.is_available()
    if not compiled:
        hidden, weight, targets, adv, old = (t.cpu() for t in (hidden, weight, targets, adv, old))
        bad = adv.clone()
        bad[3] = float("nan")
        with pytest.raises(ValueError, match="advantages"):
            grpo_loss(hidden, weight, targets, bad, old)
    bad = old.clone()
    bad[2] = float("inf")  # row 2 is ignored: its old log-prob is never used
    assert torch.isfinite(grpo_loss(hidden, weight, targets, adv, bad).loss)


def test_sums_compose_across_micro_batches(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    hidden, weight, targets, adv, old, ref = _make(37, 48, 1003, torch.float32)
    whole, dh, dw = _run(grpo_loss, hidden, weight, targets, adv, old, ref_logp=ref, kl_coef=0.05)
    w = weight.detach().clone().requires_grad_()
    parts = [
        grpo_loss(hidden[s], w, targets[s], adv[s], old[s], ref_logp=ref[s], kl_coef=0.05)
        for s in (slice(0, 20), slice(20, 37))
    ]
    sum(p.loss for p in parts).backward()
    torch.testing.assert_close(sum(p.loss for p in parts), whole.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, dw, rtol=1e-5, atol=1e-6)
    assert sum(p.num_tokens for p in parts) == whole.num_tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_triton_matches_fp64(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    hidden, weight, targets, adv, old, ref = _make(1024, 2048, 32768, torch.bfloat16)
    kw = dict(kl_coef=0.05, lo=0.2, hi=0.28, temperature=1.0)
    truth = _run(_plain_grpo, hidden.double(), weight.double(), targets, adv, old, ref, **kw)
    base = _run(_plain_grpo, hidden, weight, targets, adv, old, ref, **kw)
    out = _run(grpo_loss, hidden, weight, targets, adv, old, ref_logp=ref, kl_coef=0.05, clip_eps_high=0.28)
    for name, o, b, t in zip(("d_hidden", "d_weight"), out[1:], base[1:], truth[1:]):
        _assert_ratio(f"gpu/{name}", o, b, t)
    _assert_ratio("gpu/loss", out[0].loss, base[0].loss, truth[0].loss)
