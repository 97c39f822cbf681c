"""Triton kernels of kernels/token_logprobs.py (the math and the host side live there).

Four kernels, all tiles of z = (h @ W.T) * inv_temp: the forward (online LSE over a vocab range,
target logit), dlogits (recompute z, dz = g * (onehot - p) * inv_temp), dhidden and dweight (the two
GEMMs of the backward, fp32 accumulators). Every output element has one writer: no atomics,
deterministic. UPCAST (only under TRITON_INTERPRET=1 with bf16/fp16 inputs) works around the
interpreter's bf16 dot (triton issue 11584); IEEE_DOT gives fp32 inputs true fp32 dots (not TF32).
Grids and details: docs/pieces.md (kernels/).
"""

from __future__ import annotations

import triton
import triton.language as tl

from singleturn.kernels._backend import interpreting


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE_DOT:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    offs_n,
    offs_v,
    n_mask,
    v_mask,
    D,
    inv_temp,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """z[BLOCK_N, BLOCK_V] = (h[offs_n] @ W[offs_v].T) * inv_temp, fp32, looping over D."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rows = offs_n.to(tl.int64)[:, None] * D  # int64: V * D exceeds 2**31 for 128k x 16k heads
    cols = offs_v.to(tl.int64)[None, :] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_ptr + rows + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols + offs_d[:, None], mask=d_mask[:, None] & v_mask[None, :], other=0.0)
        acc = _dot(h, w, acc, UPCAST, IEEE_DOT)  # (BLOCK_N, BLOCK_D) @ (BLOCK_D, BLOCK_V)
    return acc * inv_temp


@triton.jit
def _token_logprobs_fwd_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    lse_part_ptr,
    mu_part_ptr,
    z_tgt_ptr,
    N,
    V,
    D,
    v_split,
    ignore_index,
    inv_temp,
    COMPUTE_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Columns [s*v_split, (s+1)*v_split) of rows [BLOCK_N]: online m, s = sum exp(z - m), and
    (entropy) t = sum exp(z - m) * (z - m); stores lse_s = m + log s, c_s = E_s[z] - lse_s = t/s - log s
    (softmax restricted to the split), and z[target] when the target lies in this range. The host combines splits: lse = logsumexp_s lse_s. The split start is
    < V (host guarantees), so the first tile has a finite max and no -inf - -inf appears."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=n_mask, other=ignore_index)
    m = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_lo = pid_s * v_split
    for v0 in range(0, v_split, BLOCK_V):
        offs_v = v_lo + v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        z = _logits_tile(
            h_ptr,
            w_ptr,
            offs_n,
            offs_v,
            n_mask,
            v_mask,
            D,
            inv_temp,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
            UPCAST,
            IEEE_DOT,
        )
        z = tl.where(v_mask[None, :], z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])  # (BLOCK_N, BLOCK_V), 0 on padded columns
        # t = sum exp(z - m) * (z - m), re-shifted when m grows (no lse - E[z] cancellation)
        if COMPUTE_ENTROPY:
            shift = tl.where(s > 0, m - m_new, 0.0) * s  # s == 0 only before the first tile (m == -inf)
            t = (t + shift) * alpha + tl.sum(p * tl.where(v_mask[None, :], z - m_new[:, None], 0.0), axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
        z_tgt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
    tl.store(lse_part_ptr + pid_s * N + offs_n, m + tl.log(s), mask=n_mask)
    if COMPUTE_ENTROPY:
        tl.store(mu_part_ptr + pid_s * N + offs_n, t / s - tl.log(s), mask=n_mask)  # E_s[z] - lse_s
    in_split = (tgt >= v_lo) & (tgt < v_lo + v_split) & (tgt != ignore_index)
    tl.store(z_tgt_ptr + offs_n, z_tgt, mask=n_mask & in_split)


@triton.jit
def _token_logprobs_dlogits_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    lse_ptr,
    g_ptr,
    dz_ptr,
    N,
    V,
    D,
    v_start,
    v_chunk,
    ignore_index,
    inv_temp,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dz[n, c] = g_n * (onehot(t_n)[v] - exp(z[n, v] - lse_n)) * inv_temp for v = v_start + c, the
    dlogits of one vocab chunk [N, v_chunk] (stored in dz_ptr's dtype). Ignored rows: g = 0 -> dz = 0."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = v_start + offs_c
    n_mask = offs_n < N
    c_mask = (offs_c < v_chunk) & (offs_v < V)
    tgt = tl.load(tgt_ptr + offs_n, mask=n_mask, other=ignore_index)
    g = tl.load(g_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    g = tl.where(tgt != ignore_index, g, 0.0) * inv_temp
    lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
    z = _logits_tile(
        h_ptr, w_ptr, offs_n, offs_v, n_mask, c_mask, D, inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, IEEE_DOT
    )
    p = tl.exp(z - lse[:, None])
    onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    dz = (onehot - p) * g[:, None]  # (BLOCK_N, BLOCK_V)
    ptrs = dz_ptr + offs_n.to(tl.int64)[:, None] * v_chunk + offs_c[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=n_mask[:, None] & c_mask[None, :])


@triton.jit
def _token_logprobs_dhidden_kernel(
    dz_ptr,
    w_ptr,
    dh_ptr,
    N,
    D,
    v_start,
    v_chunk,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dh[BLOCK_N, BLOCK_D] (+)= dz[:, chunk] @ W[v_start : v_start + v_chunk, :], fp32 in dh_ptr."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D
    dh_ptrs = dh_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
    if ACCUMULATE:
        acc = tl.load(dh_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dz_rows = offs_n.to(tl.int64)[:, None] * v_chunk
    for c0 in range(0, v_chunk, BLOCK_V):
        offs_c = c0 + tl.arange(0, BLOCK_V)
        c_mask = offs_c < v_chunk
        dz = tl.load(dz_ptr + dz_rows + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        w_rows = (v_start + offs_c).to(tl.int64)[:, None] * D
        w = tl.load(w_ptr + w_rows + offs_d[None, :], mask=c_mask[:, None] & d_mask[None, :], other=0.0)
        acc = _dot(dz, w.to(dz.dtype), acc, UPCAST, IEEE_DOT)  # (BLOCK_N, BLOCK_V) @ (BLOCK_V, BLOCK_D)
    tl.store(dh_ptrs, acc, mask=n_mask[:, None] & d_mask[None, :])


@triton.jit
def _token_logprobs_dweight_kernel(
    dz_ptr,
    h_ptr,
    dw_ptr,
    N,
    D,
    v_start,
    v_chunk,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dW[v_start + c, BLOCK_D] = sum_n dz[n, c] * h[n, BLOCK_D]: one vocab chunk's rows, over all N."""
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = offs_c < v_chunk
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dz_t = tl.load(
            dz_ptr + offs_n.to(tl.int64)[None, :] * v_chunk + offs_c[:, None],
            mask=c_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # (BLOCK_V, BLOCK_N)
        h = tl.load(
            h_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = _dot(dz_t, h.to(dz_t.dtype), acc, UPCAST, IEEE_DOT)  # (BLOCK_V, BLOCK_N) @ (BLOCK_N, BLOCK_D)
    dw_ptrs = dw_ptr + (v_start + offs_c).to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=c_mask[:, None] & d_mask[None, :])


def _configs(
    blocks: list[tuple[int, int, int, int, int]], names: tuple[str, str, str]
) -> list[triton.Config]:
    return [triton.Config(dict(zip(names, b[:3])), num_warps=b[3], num_stages=b[4]) for b in blocks]


# H100 configs: (block sizes..., num_warps, num_stages). Small lists so autotuning stays cheap.
# bf16/fp16 run tensor-core (wgmma) tiles; fp32 runs exact IEEE FMA dots (correctness, not speed),
# where 128x256 fp32 tiles would spill registers and take ~40 s each to compile.
FWD_BLOCKS = {
    "16bit": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 4), (128, 128, 64, 4, 4)],
    "fp32": [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)],
}
DHIDDEN_BLOCKS = {
    "16bit": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 4)],
    "fp32": [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)],
}
DWEIGHT_BLOCKS = {
    "16bit": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)],
    "fp32": [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)],
}
# Vocab split / chunk widths are multiples of this, hence of every BLOCK_V above.
V_ALIGN = 256
# Under the interpreter: fixed small tiles (tl.dot needs >= 16), no autotuning.
INTERPRET_FWD = dict(BLOCK_N=32, BLOCK_V=128, BLOCK_D=32)
INTERPRET_DHIDDEN = dict(BLOCK_N=32, BLOCK_D=32, BLOCK_V=128)
INTERPRET_DWEIGHT = dict(BLOCK_V=128, BLOCK_D=32, BLOCK_N=32)
INTERPRET_V_ALIGN = 128

_FWD_NAMES = ("BLOCK_N", "BLOCK_V", "BLOCK_D")
_DH_NAMES = ("BLOCK_N", "BLOCK_D", "BLOCK_V")
_DW_NAMES = ("BLOCK_V", "BLOCK_D", "BLOCK_N")


def _tuned(kernel, blocks, names, **kwargs):
    """{"16bit": kernel, "fp32": kernel}: one autotuner per precision (raw kernel under the interpreter).

    Autotuning keys on D and V (fixed per model) and the dtypes, not on N, which changes every step.
    """
    if interpreting():
        return {kind: kernel for kind in blocks}
    key = ["D", "V"] if "V" in kernel.arg_names else ["D"]
    return {
        kind: triton.autotune(configs=_configs(b, names), key=key, **kwargs)(kernel)
        for kind, b in blocks.items()
    }


fwd_kernel = _tuned(_token_logprobs_fwd_kernel, FWD_BLOCKS, _FWD_NAMES)
dlogits_kernel = _tuned(_token_logprobs_dlogits_kernel, FWD_BLOCKS, _FWD_NAMES)
dhidden_kernel = _tuned(_token_logprobs_dhidden_kernel, DHIDDEN_BLOCKS, _DH_NAMES, restore_value=["dh_ptr"])
dweight_kernel = _tuned(_token_logprobs_dweight_kernel, DWEIGHT_BLOCKS, _DW_NAMES)
