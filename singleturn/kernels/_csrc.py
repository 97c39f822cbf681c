"""Lazy build and load of the CUDA C++ ops in csrc/ (the `singleturn_rl` torch library).

The extension (csrc/bindings.cpp + csrc/sampling.cu) is compiled by `torch.utils.cpp_extension.load`
at first use on a machine with a CUDA device, cached under `$SINGLETURN_RL_BUILD_DIR` (default
`~/.cache/singleturn_rl/csrc/<torch>-<cuda>`), and loaded as a torch op library. CPU-only machines
never try. `SINGLETURN_RL_PREBUILT=/path/to/singleturn_rl_csrc.so` loads a library built ahead of time
(for the same torch and CUDA; e.g. with nvcc on a machine without a GPU) and skips the build; one that
does not load is reported and the build runs as usual. A failed build is reported by ONE warning and the callers fall back to the PyTorch
reference. `register_fake` gives the ops shape semantics for FakeTensor / torch.compile tracing.
References: pytorch/extension-cpp (TORCH_LIBRARY op + register_fake, loaded lazily).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

NAMESPACE = "singleturn_rl"
CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("bindings.cpp", "sampling.cu")

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "loaded": False, "fake": False}


def build_dir() -> Path:
    """Where the extension is built and cached (one directory per torch / CUDA version)."""
    root = os.environ.get("SINGLETURN_RL_BUILD_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "singleturn_rl" / "csrc"
    return base / f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")


def op_registered(name: str = "sample_tokens") -> bool:
    """True when `torch.ops.singleturn_rl.<name>` exists (the library is loaded in this process)."""
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register_fakes() -> None:
    """Register the fake (meta) implementations once; the schema must already be loaded."""
    with _lock:
        if _state["fake"]:
            return

        @torch.library.register_fake(f"{NAMESPACE}::sample_tokens")
        def _sample_tokens_fake(logits, temperature, top_p, top_k, seed, offset):
            B = logits.shape[0]
            return logits.new_empty(B, dtype=torch.int64), logits.new_empty(B, dtype=torch.float32)

        _state["fake"] = True


def _build_and_load() -> None:
    from torch.utils import cpp_extension  # imported lazily: pulls in setuptools

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"{NAMESPACE}_csrc",
        sources=[str(CSRC_DIR / s) for s in SOURCES],
        extra_include_paths=[str(CSRC_DIR)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo"],
        build_directory=str(out),
        is_python_module=False,
        verbose=os.environ.get("SINGLETURN_RL_BUILD_VERBOSE", "0") == "1",
    )


def load() -> bool:
    """Build (first time) and load the CUDA ops; True when `torch.ops.singleturn_rl` is usable.

    Returns False without trying on machines with no CUDA device, and False after one warning when
    the build or load fails (missing nvcc, compiler error, ...). Thread-safe; tries once per process.
    """
    if _state["tried"]:
        return bool(_state["loaded"])
    with _lock:
        if not _state["tried"]:
            _state["loaded"] = _try_load()
            _state["tried"] = True
    if _state["loaded"]:
        register_fakes()
    return bool(_state["loaded"])


def _try_load() -> bool:
    if op_registered():  # already loaded in this process (e.g. a prebuilt library)
        return True
    if not torch.cuda.is_available():
        return False
    prebuilt = os.environ.get("SINGLETURN_RL_PREBUILT")
    if prebuilt:
        try:
            torch.ops.load_library(prebuilt)
            if op_registered():
                return True
            raise RuntimeError("the library loaded but registers no singleturn_rl::sample_tokens")
        except Exception as exc:  # noqa: BLE001 -- a stale or foreign library: build instead
            warnings.warn(
                f"kernels: SINGLETURN_RL_PREBUILT={prebuilt} did not load ({type(exc).__name__}: {exc}); building",
                RuntimeWarning,
                stacklevel=3,
            )
    try:
        _build_and_load()
    except Exception as exc:  # noqa: BLE001 -- any build failure means: use the reference
        warnings.warn(
            f"kernels: building the CUDA ops in {CSRC_DIR} failed ({type(exc).__name__}: {exc}); "
            "sample_tokens falls back to the PyTorch reference (set SINGLETURN_RL_BUILD_VERBOSE=1 for the log)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return op_registered()
