"""Benchmark kernels.grpo_loss: fused log-probs + clipped surrogate + k3 KL over action tokens.

Providers: `triton` (grpo_loss on the Triton kernels), `torch-chunked` (grpo_loss on the PyTorch
reference), `torch-naive` (full [N, V] logits + the surrogate in plain PyTorch), and `liger` / `cce`
when installed (their fused log-probs + the same PyTorch surrogate). The loss includes the k3 KL to
a reference (kl_coef=0.04) and asks for entropy on the fused providers. Modes fwd, bwd, fwd+bwd;
FLOPs, timing and memory as in bench_token_logprobs.py (the surrogate itself is O(N)).

    python bench/bench_grpo_loss.py [--quick | --cpu-smoke] [--out-dir bench/results]

Output: <out-dir>/grpo_loss.jsonl (appended) and grpo_loss.md.
"""

from __future__ import annotations

import torch
from _common import base_parser, write_jsonl, write_markdown
from bench_token_logprobs import (
    COLUMNS,
    effort,
    external_logp_providers,
    logp_out_bytes,
    make_logp_inputs,
    naive_token_logprobs,
    shapes_for,
    sweep,
    with_backend,
)

from singleturn.kernels.grpo_loss import LOG_RATIO_CLAMP, grpo_loss

KL_COEF, EPS_LO, EPS_HI = 0.04, 0.2, 0.28


def surrogate(logp, old, adv, ref):
    """The per-token GRPO loss in plain PyTorch, summed (what the naive and external providers use)."""
    ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - EPS_LO, 1 + EPS_HI) * adv)
    y = torch.clamp(ref - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (loss + KL_COEF * (torch.exp(y) - y - 1)).sum()


def _fused(backend: str):
    def run(h, w, t, adv, old, ref):
        out = grpo_loss(
            h,
            w,
            t,
            adv,
            old,
            ref_logp=ref,
            kl_coef=KL_COEF,
            clip_eps_low=EPS_LO,
            clip_eps_high=EPS_HI,
            compute_entropy=True,
        )
        return out.loss

    return with_backend(backend, run)


def grpo_providers(cuda: bool) -> dict:
    providers = {"triton": _fused("triton")} if cuda else {}
    providers["torch-chunked"] = _fused("torch")
    providers["torch-naive"] = lambda h, w, t, adv, old, ref: surrogate(
        naive_token_logprobs(h, w, t), old, adv, ref
    )
    if cuda:
        for name, logp_fn in external_logp_providers().items():
            if name != "liger":  # liger returns only the summed log-prob, not per-token values
                providers[name] = lambda h, w, t, adv, old, ref, f=logp_fn: surrogate(
                    f(h, w, t), old, adv, ref
                )
    return providers


def make_grpo_inputs(N, D, V, dtype, device):
    (hidden, weight, targets), grad_of = make_logp_inputs(N, D, V, dtype, device)
    g = torch.Generator(device=hidden.device).manual_seed(1)
    with torch.no_grad():
        logp = with_backend(
            "triton" if hidden.is_cuda else "torch", lambda: token_logprobs_detached(hidden, weight, targets)
        )()
    old = logp + 0.2 * torch.randn(N, device=hidden.device, generator=g)
    ref = logp + 0.2 * torch.randn(N, device=hidden.device, generator=g)
    adv = torch.randn(N, device=hidden.device, generator=g)
    return (hidden, weight, targets, adv, old, ref), grad_of


def token_logprobs_detached(hidden, weight, targets):
    from singleturn.kernels.token_logprobs import token_logprobs

    return token_logprobs(hidden.detach(), weight.detach(), targets)


def grpo_out_bytes(N, D, V, dtype, mode) -> int:
    return logp_out_bytes(N, D, V, dtype, mode) - (N * 4 if mode != "bwd" else 0)  # the output is a scalar


def main(argv=None) -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    shapes, dtype = shapes_for(args, cuda)
    device = "cuda" if cuda else "cpu"
    rows = sweep(
        "grpo_loss",
        grpo_providers(cuda),
        shapes,
        dtype,
        device,
        make_grpo_inputs,
        grpo_out_bytes,
        effort(args, cuda),
    )
    write_jsonl(args.out_dir, "grpo_loss", rows)
    path = write_markdown(args.out_dir, "grpo_loss", "grpo_loss: fused GRPO policy loss", rows, COLUMNS)
    print(path.read_text())


if __name__ == "__main__":
    main()
