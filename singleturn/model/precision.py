"""The dtype each device runs fastest: `dtype = "auto"` in a config resolves here, once, with its reason.

- CUDA: bf16 when the device supports it (tensor cores), else fp32.
- CPU: bf16 when the CPU has native bf16 dot products (`avx512_bf16` or `amx_bf16` in its flags):
  measured on SmolLM2-135M with 2 threads, bf16 prefill 1,100-1,230 tokens/s vs fp32 640 there;
  without them bf16 is emulated and 2-6x SLOWER than fp32 (an AVX2-only EPYC, README), so fp32.
- CPU flags unreadable (not Linux): a probe of about a second times one matmul-heavy block in both
  dtypes and keeps the faster; skipped (fp32) when `probe=False`, e.g. several ranks that must agree.

An explicit dtype in a config is never touched; only "auto" is resolved.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

__all__ = ["BF16_CPU_FLAGS", "cpu_flags", "fastest_dtype"]

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags that make bf16 matmuls native (oneDNN uses them) rather than emulated."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (Linux /proc/cpuinfo), or None when they cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def _probe_ms(dtype: torch.dtype, reps: int = 3) -> float:
    """Median ms of a (256 x 1024) @ (1024 x 1024) block, twice, in `dtype` on the CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=g).to(dtype)
    w1 = torch.randn(1024, 1024, generator=g).to(dtype)
    w2 = torch.randn(1024, 1024, generator=g).to(dtype)
    (x @ w1) @ w2  # warm-up (oneDNN primitive creation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        (x @ w1) @ w2
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def fastest_dtype(device_type: str, *, probe: bool = True, flags: set[str] | None = None) -> tuple[str, str]:
    """("bfloat16" | "float32", why) for `device_type` ("cuda" or "cpu").

    flags: the CPU flags to decide by (default: read them); probe: time both dtypes when they are
    unreadable (else fp32)."""
    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16", f"CUDA device {torch.cuda.get_device_name()} supports bf16"
        return "float32", "CUDA device without bf16 support"
    if device_type != "cpu":
        raise ValueError(f"fastest_dtype: device type 'cuda' or 'cpu', got {device_type!r}")
    if flags is None:
        flags = cpu_flags()
    if flags is not None:
        have = [f for f in BF16_CPU_FLAGS if f in flags]
        if have:
            return "bfloat16", f"the CPU has {' and '.join(have)} (native bf16 matmuls)"
        return "float32", "the CPU has neither avx512_bf16 nor amx_bf16 (bf16 would be emulated, 2-6x slower)"
    if not probe:
        return "float32", "CPU flags unreadable and no probe allowed"
    t32, t16 = _probe_ms(torch.float32), _probe_ms(torch.bfloat16)
    choice = "bfloat16" if t16 < t32 else "float32"
    return choice, f"CPU flags unreadable; probe: bf16 {t16:.1f} ms vs fp32 {t32:.1f} ms"
