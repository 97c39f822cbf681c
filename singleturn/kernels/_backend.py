"""Backend dispatch shared by the kernels ops (and csrc's 'cuda' backend): which implementation runs.

`KERNELS_BACKEND=triton|cuda|torch` forces a backend; unset, CUDA tensors get Triton and everything
else the PyTorch reference. Under `TRITON_INTERPRET=1` the Triton kernels run on CPU tensors (slowly,
in numpy), which is how the test-suite checks them without a GPU.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "cuda", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the numpy interpreter (TRITON_INTERPRET=1), not compiled."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(tensor: torch.Tensor, available: tuple[str, ...] = ("triton", "torch")) -> str:
    """The backend an op should use for `tensor`, one of `available`.

    KERNELS_BACKEND, when set, picks the backend if this op has it. A name outside BACKENDS (a typo)
    is an error; a valid backend this op lacks (KERNELS_BACKEND=cuda, which only some ops have) gives
    the default below. Default: the first of ("cuda", "triton") in `available` for CUDA tensors,
    "torch" otherwise. Triton on CPU tensors is only valid under TRITON_INTERPRET=1.
    """
    requested = os.environ.get("KERNELS_BACKEND", "").strip().lower()
    if requested not in ("", *BACKENDS):
        raise ValueError(f"KERNELS_BACKEND={requested!r}; expected one of {BACKENDS}")
    if requested in available:
        if requested == "triton" and not tensor.is_cuda and not interpreting():
            raise ValueError("KERNELS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        return requested
    if tensor.is_cuda:
        for name in ("cuda", "triton"):
            if name in available:
                return name
    return "torch"


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Reject non-finite values. CPU: raises ValueError. CUDA: an async device assert (no host sync)."""
    if tensor.is_cuda:
        torch._assert_async(torch.isfinite(tensor).all(), f"{name} has non-finite values")
    elif not bool(torch.isfinite(tensor).all()):
        bad = (~torch.isfinite(tensor)).nonzero()[:5].flatten().tolist()
        raise ValueError(f"{name} has non-finite values (first at flat indices {bad})")
