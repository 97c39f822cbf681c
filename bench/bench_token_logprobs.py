"""Benchmark kernels.token_logprobs: the fused LM head + log-softmax + gather over action tokens.

Providers: `triton` (the fused kernels), `torch-chunked` (the chunked PyTorch reference),
`torch-naive` (full [N, V] logits + autograd: the baseline), and `liger` / `cce` when installed
(Liger-Kernel's fused linear cross-entropy, with reduction="sum" since it computes gradients inside
its forward; Apple's cut-cross-entropy). Modes: fwd, bwd (backward of a retained graph), fwd+bwd.
Reported: median / p20 / p80 ms, TFLOP/s (2NDV forward, 4NDV backward: the model FLOPs, not the
recompute the kernels do), peak memory above the inputs and "extra" memory (peak minus the outputs
the mode keeps: logp, d_hidden, d_weight).

    python bench/bench_token_logprobs.py [--quick | --cpu-smoke] [--out-dir bench/results]

GPU sweep: N in {1024..16384} for D=4096 and D=2048, V=128256 (LLaMA-3), bf16. --quick: three
shapes. --cpu-smoke (automatic without a GPU): tiny fp32 shapes, torch providers.
Output: <out-dir>/token_logprobs.jsonl (appended) and token_logprobs.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from _common import base_parser, env_info, peak_memory_bytes, time_ms, write_jsonl, write_markdown

from singleturn.kernels.token_logprobs import token_logprobs

MODES = ("fwd", "bwd", "fwd+bwd")
MODEL_FLOPS_PER_NDV = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}
COLUMNS = [
    ("provider", "provider"),
    ("mode", "mode"),
    ("N", "N"),
    ("D", "D"),
    ("V", "V"),
    ("dtype", "dtype"),
    ("ms_median", "ms"),
    ("ms_p20", "p20"),
    ("ms_p80", "p80"),
    ("tflops", "TFLOP/s"),
    ("mem_peak_mb", "peak MB"),
    ("mem_extra_mb", "extra MB"),
    ("error", "error"),
]


def naive_token_logprobs(hidden, weight, targets, temperature=1.0):
    """The baseline: full [N, V] logits in the input dtype, fp32 log-softmax, gather."""
    z = (hidden @ weight.T).float() / temperature  # (N, V)
    return torch.log_softmax(z, dim=-1).gather(1, targets[:, None]).squeeze(1)


def with_backend(backend: str, fn: Callable) -> Callable:
    """fn run with KERNELS_BACKEND=backend (read by kernels._backend at every call)."""

    def run(*args, **kwargs):
        old = os.environ.get("KERNELS_BACKEND")
        os.environ["KERNELS_BACKEND"] = backend
        try:
            return fn(*args, **kwargs)
        finally:
            os.environ.pop("KERNELS_BACKEND") if old is None else os.environ.__setitem__(
                "KERNELS_BACKEND", old
            )

    return run


def external_logp_providers() -> dict[str, Callable]:
    """Third-party fused log-prob implementations that are installed: name -> fn(h, w, t) -> logp."""
    out = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        out["liger"] = lambda h, w, t: -liger(w, h, t)  # sum of logp: liger's backward needs a scalar
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cce"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none")
    except ImportError:
        pass
    return out


def logp_providers(cuda: bool) -> dict[str, Callable]:
    providers = {"triton": with_backend("triton", token_logprobs)} if cuda else {}
    providers["torch-chunked"] = with_backend("torch", token_logprobs)
    providers["torch-naive"] = naive_token_logprobs
    if cuda:
        providers.update(external_logp_providers())
    return providers


def measure(
    name: str, fn: Callable, inputs: tuple, grad_of: tuple, mode: str, effort: str, out_bytes: int
) -> dict:
    """Time and measure one provider in one mode. fn(*inputs) -> a tensor; gradients w.r.t. grad_of."""
    device = inputs[0].device

    def forward():
        return fn(*inputs)

    def backward_of(out):
        g = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)
        return lambda: torch.autograd.grad(out, grad_of, g, retain_graph=True)

    if mode == "fwd":
        run = forward
    elif mode == "bwd":
        run = backward_of(forward())
    else:
        run = lambda: backward_of(forward())()
    warmup_ms, rep_ms = {"smoke": (0, 1), "quick": (10, 50), "full": (25, 200)}[effort]
    t = time_ms(run, warmup_ms=warmup_ms, rep_ms=rep_ms)
    peak = peak_memory_bytes(run, device)
    return {**t, "mem_peak_mb": peak / 2**20, "mem_extra_mb": max(0, peak - out_bytes) / 2**20}


def sweep(
    op: str, providers: dict, shapes, dtype, device, make_inputs, out_bytes_of, effort: str
) -> list[dict]:
    """Every provider x mode x shape; failures (OOM, missing features) become rows with an error."""
    env, rows = env_info(), []
    for N, D, V in shapes:
        inputs, grad_of = make_inputs(N, D, V, dtype, device)
        for mode in MODES:
            for name, fn in providers.items():
                row = {
                    **env,
                    "op": op,
                    "provider": name,
                    "mode": mode,
                    "N": N,
                    "D": D,
                    "V": V,
                    "dtype": str(dtype).split(".")[-1],
                }
                try:
                    row.update(
                        measure(name, fn, inputs, grad_of, mode, effort, out_bytes_of(N, D, V, dtype, mode))
                    )
                    row["tflops"] = MODEL_FLOPS_PER_NDV[mode] * N * D * V / (row["ms_median"] * 1e-3) / 1e12
                except Exception as e:  # noqa: BLE001 - one provider failing must not stop the sweep
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                if inputs[0].is_cuda:
                    torch.cuda.empty_cache()
                rows.append(row)
                print(
                    f"[{op}] {name:14s} {mode:8s} N={N} D={D} V={V}: "
                    + (
                        f"{row['ms_median']:.3f} ms {row['tflops']:.1f} TFLOP/s extra {row['mem_extra_mb']:.0f} MB"
                        if "error" not in row
                        else row["error"]
                    ),
                    flush=True,
                )
        del inputs
    return rows


def shapes_for(args, cuda: bool) -> tuple[list, torch.dtype]:
    if args.cpu_smoke or not cuda:
        return [(37, 48, 1003)], torch.float32
    if args.quick:
        return [(8192, 4096, 128256), (2048, 4096, 128256), (8192, 2048, 128256)], torch.bfloat16
    return [(n, d, 128256) for d in (4096, 2048) for n in (1024, 2048, 4096, 8192, 16384)], torch.bfloat16


def effort(args, cuda: bool) -> str:
    return "smoke" if not cuda else ("quick" if args.quick else "full")


def make_logp_inputs(N, D, V, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, D, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device=device, generator=g) * D**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    return (hidden, weight, targets), (hidden, weight)


def logp_out_bytes(N, D, V, dtype, mode) -> int:
    """Bytes of the outputs a mode keeps (logp; d_hidden + d_weight): not counted as extra memory."""
    el = torch.finfo(dtype).bits // 8
    grads = (N * D + V * D) * el
    return {"fwd": N * 4, "bwd": grads, "fwd+bwd": N * 4 + grads}[mode]


def main(argv=None) -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    shapes, dtype = shapes_for(args, cuda)
    device = "cuda" if cuda else "cpu"
    providers = logp_providers(cuda)
    rows = sweep(
        "token_logprobs",
        providers,
        shapes,
        dtype,
        device,
        make_logp_inputs,
        logp_out_bytes,
        effort(args, cuda),
    )
    write_jsonl(args.out_dir, "token_logprobs", rows)
    path = write_markdown(
        args.out_dir, "token_logprobs", "token_logprobs: fused LM head log-probs", rows, COLUMNS
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
