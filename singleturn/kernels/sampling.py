"""Token sampling for rollouts: temperature, top-k / top-p truncation, a counter-based draw.

`sample_tokens(logits[B,V], ...) -> (tokens[B] int64, logprobs[B] fp32)` is what `model.generate`
calls once per decode step; `logprobs` are under the truncated distribution (what the GRPO ratio
needs). The PyTorch reference here defines the semantics every backend matches (truncation sets
by thresholds, not sorted prefixes; one Philox4x32-10 uniform per row keyed by seed and
(offset, row); temperature == 0 is greedy). CUDA tensors go to the fused kernel in csrc/ when it
builds, else to the reference. The math and the kernel's tolerances: docs/pieces.md (kernels/).
"""

from __future__ import annotations

import os

import torch

from singleturn.kernels import _csrc
from singleturn.kernels._backend import select_backend

_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def philox_uniform(seed: int, offset: int, rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms in (0, 1), float64 [rows]: Philox4x32-10, key = seed, counter = (offset_lo, offset_hi, row, 0).

    Word 0 of each output block becomes u = (x0 + 0.5) / 2**32. int64 tensors hold the 32-bit words
    so the products (< 2**64) are split exactly into hi/lo halves.
    """
    row = torch.arange(rows, dtype=torch.int64, device=device)  # on the logits' device: no host sync
    c0 = torch.full_like(row, offset & _MASK32)
    c1 = torch.full_like(row, (offset >> 32) & _MASK32)
    c2 = row & _MASK32
    c3 = torch.zeros_like(row)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        p0_hi, p0_lo = _mulhilo(_PHILOX_M0, c0)
        p1_hi, p1_lo = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = p1_hi ^ c1 ^ k0, p1_lo, p0_hi ^ c3 ^ k1, p0_lo
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return (c0.double() + 0.5) / 2.0**32


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 32x32 -> 64-bit product via 16-bit halves of m, exact in int64.
    m_lo, m_hi = m & 0xFFFF, m >> 16
    lo_part = x * m_lo  # < 2**48
    hi_part = x * m_hi  # < 2**48
    prod_lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & _MASK32
    carry = (lo_part + ((hi_part & 0xFFFF) << 16)) >> 32
    prod_hi = ((hi_part >> 16) + carry) & _MASK32
    return prod_hi, prod_lo


def truncation_mask(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Bool [B,V]: the tokens kept by top-k then top-p, as thresholds (ties at a boundary kept)."""
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        keep = probs >= kth
    if top_p < 1.0:
        p = torch.where(keep, probs, 0.0)
        p = p / p.sum(-1, keepdim=True)
        sorted_p, _ = p.sort(dim=-1, descending=True)
        cum = _tie_aware_cumsum(sorted_p)  # (B, V) mass of all tokens at least as likely as sorted_p[i]
        # tau = the largest sorted value whose at-least-as-likely mass reaches top_p.
        reach = cum >= top_p
        first = torch.where(
            reach.any(-1),
            reach.float().argmax(-1),
            torch.full_like(reach[:, 0], p.shape[-1] - 1, dtype=torch.int64),
        )
        tau = sorted_p.gather(-1, first[:, None])  # (B, 1)
        keep = keep & (p >= tau)
    return keep


def _tie_aware_cumsum(sorted_p: torch.Tensor) -> torch.Tensor:
    # For descending sorted_p: cumsum, then every member of a tie run takes the run's last cumsum.
    cum = sorted_p.cumsum(-1)
    B, V = sorted_p.shape
    idx = torch.arange(V, device=sorted_p.device).expand(B, V)
    new_run = torch.ones_like(sorted_p, dtype=torch.bool)
    new_run[:, 1:] = sorted_p[:, 1:] != sorted_p[:, :-1]
    # Index of the last element of each run: reverse cummax of run-end markers.
    run_end = torch.ones_like(new_run)
    run_end[:, :-1] = new_run[:, 1:]
    end_idx = torch.where(run_end, idx, V).flip(-1).cummin(-1).values.flip(-1)
    return cum.gather(-1, end_idx)


def sample_tokens_reference(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of `sample_tokens` (any device): tokens[B] int64, logprobs[B] fp32."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    B, _ = logits.shape
    if temperature == 0.0:
        return logits.argmax(-1), torch.zeros(B, dtype=torch.float32, device=logits.device)
    scaled = logits.float() / temperature
    probs = torch.softmax(scaled, dim=-1)  # fp32 (B, V)
    keep = truncation_mask(probs, top_k, top_p)
    kept = torch.where(keep, probs, 0.0).double()  # float64 scan so the reference is the accurate side
    z = kept.sum(-1, keepdim=True)  # (B, 1)
    u = philox_uniform(seed, offset, B, logits.device)[:, None]  # (B, 1) float64
    cdf = kept.cumsum(-1)
    tokens = (cdf <= u * z).sum(-1).clamp_max(logits.shape[-1] - 1)  # first index with cdf > u*Z
    # A token outside `keep` can only be reached through float round-off at the very end: step back.
    tokens = torch.where(keep.gather(-1, tokens[:, None])[:, 0], tokens, _last_kept(keep))
    lse = torch.logsumexp(torch.where(keep, scaled, float("-inf")), dim=-1)
    logp = scaled.gather(-1, tokens[:, None])[:, 0] - lse
    return tokens, logp.float()


def _last_kept(keep: torch.Tensor) -> torch.Tensor:
    V = keep.shape[-1]
    return (V - 1) - keep.flip(-1).float().argmax(-1)


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits[B, V] -> (tokens[B] int64, logprobs[B] fp32).

    Dispatches to the CUDA op (csrc/) for CUDA tensors when it is built and KERNELS_BACKEND allows
    it, else to the PyTorch reference. Semantics: see the module docstring.
    """
    if not (temperature >= 0.0):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if logits.is_cuda and logits.dim() == 2 and _backend_for(logits) == "cuda" and _csrc.load():
        if logits.dtype not in (torch.float32, torch.bfloat16):
            logits = logits.float()  # the reference also samples in fp32; the kernel reads fp32 or bf16
        # detach: sampling is not differentiable; the op has no autograd kernel (use token_logprobs for grads).
        return torch.ops.singleturn_rl.sample_tokens(
            logits.detach(), float(temperature), float(top_p), int(top_k), _as_int64(seed), _as_int64(offset)
        )
    return sample_tokens_reference(
        logits, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, offset=offset
    )


def _backend_for(logits: torch.Tensor) -> str:
    # No Triton sampler: KERNELS_BACKEND=triton (set for the other ops) means the reference here.
    if os.environ.get("KERNELS_BACKEND", "").strip().lower() == "triton":
        return "torch"
    return select_backend(logits, available=("cuda", "torch"))


def _as_int64(value: int) -> int:
    # The reference uses the low 64 bits of seed / offset (two 32-bit words); the op takes them as int64.
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value
