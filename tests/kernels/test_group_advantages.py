"""group_advantages (Triton under TRITON_INTERPRET=1, and the PyTorch reference) vs a float64 formula.

Rewards are not differentiable (they come from the verifier), so there is no gradient to check; the
forward is checked against fp64 with the error-ratio rule, plus the exact-zero contract.
"""

import pytest
import torch

from singleturn.kernels.group_advantages import group_advantages

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", request.param)
    return request.param


def _fp64_advantages(rewards, G, scale, eps):
    r = rewards.double().view(-1, G)
    out = []
    for row in r.tolist():
        mean = sum(row) / G
        if all(x == row[0] for x in row):
            out.append([0.0] * G)
            continue
        std = (sum((x - mean) ** 2 for x in row) / (G - 1)) ** 0.5
        out.append([(x - mean) / (std + eps) if scale == "std" else x - mean for x in row])
    return torch.tensor(out, dtype=torch.float64).view(-1)


@pytest.mark.parametrize("G", [1, 2, 5, 8, 37])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_matches_fp64(backend, G, scale):
    g = torch.Generator().manual_seed(G)
    B = 11
    rewards = torch.rand(B * G, generator=g)
    rewards[:G] = (rewards[:G] > 0.5).float()  # a binary group, as with the expert-match reward
    rewards[G : 2 * G] = 0.1  # a constant group whose r - mean is not exactly 0 in floating point
    ref = _fp64_advantages(rewards, G, scale, 1e-6)
    base = _fp64_advantages(rewards.float(), G, scale, 1e-6).float()  # fp32 storage of the truth
    out = group_advantages(rewards.to(DEVICE), G, scale=scale, eps=1e-6).cpu()
    assert out.dtype == torch.float32 and out.shape == rewards.shape
    err = (out.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    assert err <= 2 * base_err + 1e-6 * (1 + ref.abs().max().item()), (
        f"max err {err:.3e} (fp32 rounding {base_err:.3e})"
    )
    assert torch.all(out[G : 2 * G] == 0), "a constant group must give exactly zero advantage"


def test_all_groups_constant_give_exact_zeros(backend):
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3], device=DEVICE)
    for scale in ("std", "none"):
        assert torch.all(group_advantages(rewards, 3, scale=scale) == 0)


def test_binary_group_values(backend):
    # Half right: mean 0.5, unbiased std sqrt(1/3) -> +-0.866; Dr. GRPO: +-0.5.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], device=DEVICE)
    expected = torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (1 / 3) ** 0.5
    torch.testing.assert_close(group_advantages(rewards, 4, eps=0.0).cpu(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none").cpu(), expected * (1 / 3) ** 0.5)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="dividing"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="mad")


def test_backend_selection(monkeypatch):
    from singleturn.kernels._backend import select_backend

    cpu = torch.zeros(1)
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    assert select_backend(cpu) == "torch"
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")  # an op without a CUDA C++ backend uses its default
    assert select_backend(cpu, available=("triton", "torch")) == "torch"
    assert select_backend(cpu, available=("cuda", "torch")) == "cuda"
    monkeypatch.setenv("KERNELS_BACKEND", "trition")
    with pytest.raises(ValueError, match="expected one of"):
        select_backend(cpu)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        select_backend(cpu)
