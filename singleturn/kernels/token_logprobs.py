"""Fused LM head + log-softmax + gather: log-probs of the action tokens without [N, V] logits.

    logp_i = z_{i, t_i} - logsumexp_v z_iv,   z = (hidden @ weight.T) / T   (never stored whole)

Only response tokens need log-probs and the vocabulary is 128k, so the LM head is the memory spike.
Triton (CUDA, or CPU under TRITON_INTERPRET=1): vocabulary tiles with an online log-sum-exp, only
the LSE saved; the backward recomputes bounded dlogits chunks for two GEMMs. The PyTorch reference
is chunked over tokens too. Details: docs/pieces.md (kernels/).

References: Liger-Kernel fused_linear_cross_entropy; Wijmans et al. 2024, "Cut Your Losses in
Large-Vocabulary Language Models" (Apple CCE); Milakov & Gimelshein 2018 (online softmax).
"""

from __future__ import annotations

import torch

from singleturn.kernels._backend import interpreting, select_backend

IGNORE_INDEX = -100
# Budget for one chunk of fp32 logits in the PyTorch reference (a few such buffers live at once).
_TORCH_CHUNK_BYTES = 8 * 2**20
# Budget for the Triton backward's dlogits chunk [N, Vc] (input dtype).
_TRITON_DLOGITS_BYTES = 32 * 2**20


def _check_inputs(hidden, weight, targets, temperature, ignore_index) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={tuple(hidden.shape[:1])}, got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hidden/weight must share a float dtype, got {hidden.dtype}, {weight.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32/int64, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError("hidden, weight and targets must be on one device")
    bad = ((targets < 0) | (targets >= weight.shape[0])) & (targets != ignore_index)
    if targets.is_cuda:
        torch._assert_async(~bad.any(), "token_logprobs: targets out of [0, V)")  # no host sync
    elif bool(bad.any()):
        raise ValueError(
            f"targets out of [0, {weight.shape[0]}) at rows {bad.nonzero().flatten()[:5].tolist()}"
        )


# ----------------------------------------------------------------------------- PyTorch reference


def _torch_chunk_rows(V: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (V * 4))


@torch.no_grad()
def _token_logprobs_torch_fwd(hidden, weight, targets, inv_temp, ignore_index, compute_entropy, chunk_bytes):
    """-> (logp[N] fp32, lse[N] fp32, entropy[N] fp32 | None), chunked over rows."""
    N = hidden.shape[0]
    logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros(N, dtype=torch.float32, device=hidden.device) if compute_entropy else None
    rows = _torch_chunk_rows(weight.shape[0], chunk_bytes)
    for n0 in range(0, N, rows):
        h, t = hidden[n0 : n0 + rows], targets[n0 : n0 + rows]
        valid = t != ignore_index
        # The matmul runs in the input dtype (like F.linear); everything after it in fp32.
        z = (h @ weight.T).float().mul_(inv_temp)  # (n, V); in place: the matmul output is fresh
        lse_c = torch.logsumexp(z, dim=-1)  # (n,)
        z_t = z.gather(1, torch.where(valid, t, 0).long()[:, None]).squeeze(1)
        logp[n0 : n0 + rows] = torch.where(valid, z_t - lse_c, 0.0)
        lse[n0 : n0 + rows] = lse_c
        if compute_entropy:
            p = torch.exp(z - lse_c[:, None])  # (n, V)
            entropy[n0 : n0 + rows] = torch.where(valid, -(p * (z - lse_c[:, None])).sum(-1), 0.0)
    return logp, lse, entropy


@torch.no_grad()
def _token_logprobs_torch_bwd(
    grad_logp, hidden, weight, targets, lse, inv_temp, ignore_index, chunk_bytes, need_dh=True, need_dw=True
):
    """-> (d_hidden[N, D] | None, d_weight[V, D] | None) in the input dtypes; d_weight accumulates in fp32."""
    N = hidden.shape[0]
    d_hidden = torch.empty_like(hidden)
    d_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    )  # (V, D)
    rows = _torch_chunk_rows(weight.shape[0], chunk_bytes)
    for n0 in range(0, N, rows):
        h, t = hidden[n0 : n0 + rows], targets[n0 : n0 + rows]
        valid = t != ignore_index
        g = torch.where(valid, grad_logp[n0 : n0 + rows].float(), 0.0)  # masked rows: exact zero grad
        z = (h @ weight.T).float().mul_(inv_temp)  # (n, V)
        dz = z.sub_(lse[n0 : n0 + rows, None]).exp_().mul_(-g[:, None])  # -g * softmax, in z's buffer
        dz.scatter_add_(1, torch.where(valid, t, 0).long()[:, None], g[:, None])  # + g * onehot
        dz.mul_(inv_temp)
        if need_dh:
            d_hidden[n0 : n0 + rows] = dz.to(hidden.dtype) @ weight
        if need_dw:
            d_weight.addmm_(dz.T, h.float())
    return (d_hidden if need_dh else None), (d_weight.to(weight.dtype) if need_dw else None)


# ----------------------------------------------------------------------------- Triton host side


def _launch_flags(hidden):
    """(kernels module, UPCAST, IEEE_DOT, config family); UPCAST only ever under the interpreter."""
    # Triton (optional on CPU; @triton.jit reads TRITON_INTERPRET when this is first imported).
    from singleturn.kernels import _token_logprobs_kernels as K

    upcast = interpreting() and hidden.dtype != torch.float32
    ieee = upcast or hidden.dtype == torch.float32
    return K, upcast, ieee, ("fp32" if hidden.dtype == torch.float32 else "16bit")


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


@torch.no_grad()
def _triton_fwd(hidden, weight, targets, inv_temp, ignore_index, compute_entropy):
    """-> (logp[N], lse[N], entropy[N] | None), all fp32; splits the vocab across programs."""
    K, upcast, ieee, kind = _launch_flags(hidden)
    N, D = hidden.shape
    V = weight.shape[0]
    logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return logp, logp.clone(), (logp.clone() if compute_entropy else None)
    align, rows = (K.INTERPRET_V_ALIGN, K.INTERPRET_FWD["BLOCK_N"]) if interpreting() else (K.V_ALIGN, 128)
    # Enough (row block, vocab range) programs to fill the GPU ~4 waves even when N is small.
    splits = max(1, min(_cdiv(4 * _num_sms(hidden.device), _cdiv(N, rows)), _cdiv(V, align)))
    v_split = _cdiv(_cdiv(V, splits), align) * align
    splits = _cdiv(V, v_split)  # every split starts below V
    lse_part = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)  # (S, N)
    mu_part = torch.empty_like(lse_part) if compute_entropy else lse_part
    z_tgt = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    meta = K.INTERPRET_FWD if interpreting() else {}
    grid = lambda META: (_cdiv(N, META["BLOCK_N"]), splits)
    tensors = (hidden, weight, targets, lse_part, mu_part, z_tgt)
    sizes = (N, V, D, v_split, ignore_index, inv_temp)
    K.fwd_kernel[kind][grid](
        *tensors, *sizes, COMPUTE_ENTROPY=compute_entropy, UPCAST=upcast, IEEE_DOT=ieee, **meta
    )
    lse = torch.logsumexp(lse_part, dim=0)  # (N,)
    valid = targets != ignore_index
    logp = torch.where(valid, z_tgt - lse, 0.0)
    entropy = None
    if compute_entropy:
        # H = lse - E[z] = -sum_s w_s (c_s + lse_s - lse), w_s = exp(lse_s - lse): small terms only.
        entropy = -(torch.exp(lse_part - lse) * (mu_part + lse_part - lse)).sum(0)
        entropy = torch.where(valid, entropy, 0.0)
    return logp, lse, entropy


@torch.no_grad()
def _triton_bwd(grad_logp, hidden, weight, targets, lse, inv_temp, ignore_index, need_dh=True, need_dw=True):
    """-> (d_hidden | None, d_weight | None): per vocab chunk, dlogits [N, Vc] then two GEMMs (fp32 acc)."""
    K, upcast, ieee, kind = _launch_flags(hidden)
    N, D = hidden.shape
    V = weight.shape[0]
    if N == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight)
    # The interpreter truncates fp32 -> bf16 casts, so there dlogits and dW stay fp32 (see kernels).
    dz_dtype = torch.float32 if upcast else hidden.dtype
    align = K.INTERPRET_V_ALIGN if interpreting() else K.V_ALIGN
    chunk = max(align, _TRITON_DLOGITS_BYTES // (N * dz_dtype.itemsize) // align * align)
    chunk = min(chunk, _cdiv(V, align) * align)
    dz_buf = torch.empty(N * chunk, dtype=dz_dtype, device=hidden.device)
    # fp32: sums chunks
    d_hidden = torch.empty(N, D, dtype=torch.float32, device=hidden.device) if need_dh else None
    d_weight = (
        torch.empty(V, D, dtype=torch.float32 if upcast else weight.dtype, device=weight.device)
        if need_dw
        else None
    )
    fwd_meta, dh_meta, dw_meta = (
        (K.INTERPRET_FWD, K.INTERPRET_DHIDDEN, K.INTERPRET_DWEIGHT) if interpreting() else ({}, {}, {})
    )
    for i, v0 in enumerate(range(0, V, chunk)):
        width = min(chunk, V - v0)
        dz = dz_buf[: N * width].view(N, width)
        args = (hidden, weight, targets, lse, grad_logp, dz, N, V, D, v0, width, ignore_index, inv_temp)
        K.dlogits_kernel[kind][lambda M, w=width: (_cdiv(N, M["BLOCK_N"]), _cdiv(w, M["BLOCK_V"]))](
            *args, UPCAST=upcast, IEEE_DOT=ieee, **fwd_meta
        )
        if need_dh:
            flags = dict(ACCUMULATE=i > 0, UPCAST=upcast, IEEE_DOT=ieee, **dh_meta)
            K.dhidden_kernel[kind][lambda M: (_cdiv(N, M["BLOCK_N"]), _cdiv(D, M["BLOCK_D"]))](
                dz, weight, d_hidden, N, D, v0, width, **flags
            )
        if need_dw:
            K.dweight_kernel[kind][lambda M, w=width: (_cdiv(w, M["BLOCK_V"]), _cdiv(D, M["BLOCK_D"]))](
                dz, hidden, d_weight, N, D, v0, width, UPCAST=upcast, IEEE_DOT=ieee, **dw_meta
            )
    dz = dz_buf = None  # free the dlogits chunk before the d_hidden cast allocates its output
    return (d_hidden.to(hidden.dtype) if need_dh else None), (d_weight.to(weight.dtype) if need_dw else None)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- autograd + public


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: saves hidden, weight, targets and the LSE; the backward recomputes logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, compute_entropy, backend):
        inv_temp = 1.0 / temperature
        if backend == "triton":
            logp, lse, entropy = _triton_fwd(hidden, weight, targets, inv_temp, ignore_index, compute_entropy)
        else:
            logp, lse, entropy = _token_logprobs_torch_fwd(
                hidden, weight, targets, inv_temp, ignore_index, compute_entropy, _TORCH_CHUNK_BYTES
            )
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.inv_temp, ctx.ignore_index, ctx.backend = inv_temp, ignore_index, backend
        if entropy is None:
            entropy = torch.zeros_like(logp)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_logp = grad_logp.contiguous()
        need_dh, need_dw = ctx.needs_input_grad[:2]  # e.g. a frozen head: skip its GEMM
        if ctx.backend == "triton":
            d_hidden, d_weight = _triton_bwd(
                grad_logp, hidden, weight, targets, lse, ctx.inv_temp, ctx.ignore_index, need_dh, need_dw
            )
        else:
            args = (grad_logp, hidden, weight, targets, lse, ctx.inv_temp, ctx.ignore_index)
            d_hidden, d_weight = _token_logprobs_torch_bwd(*args, _TORCH_CHUNK_BYTES, need_dh, need_dw)
        return d_hidden, d_weight, None, None, None, None, None


def token_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` plus the per-token entropy of softmax(z / T) (fp32 [N], detached; None unless asked)."""
    _check_inputs(hidden, weight, targets, temperature, ignore_index)
    backend = select_backend(hidden)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    logp, entropy = TokenLogprobsFunction.apply(
        hidden, weight, targets, float(temperature), int(ignore_index), bool(compute_entropy), backend
    )
    return logp, (entropy if compute_entropy else None)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """log softmax((hidden @ weight.T) / temperature)[i, targets[i]] -> logp[N] fp32.

    hidden [N, D] and weight [V, D] in bf16/fp16/fp32 (one dtype; fp32 accumulation), targets [N]
    int. Rows whose target is `ignore_index` get logp 0 and exactly zero gradient. Differentiable in
    hidden and weight; the Triton path never materializes [N, V].
    """
    logp, _ = token_logprobs_and_entropy(
        hidden, weight, targets, temperature=temperature, ignore_index=ignore_index
    )
    return logp
