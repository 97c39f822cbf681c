"""Suite-wide set-up: Triton kernels run under the interpreter when there is no GPU.

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, so it must be set before any
kernels module is imported; a conftest at the tests root runs first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # SINGLETURN_TEST_THREADS=1 lets several test runs share 2 cores without oversubscribing them.
    threads = os.environ.get("SINGLETURN_TEST_THREADS")
    torch.set_num_threads(int(threads) if threads else max(1, min(2, os.cpu_count() or 1)))
