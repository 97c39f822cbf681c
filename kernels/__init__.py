"""Fused ops for single-turn RL: log-probs over action tokens, GRPO advantages and loss, sampling.

Each op lives in its own module (Triton kernel + PyTorch reference + autograd wrapper + one public
function). Backend choice: `KERNELS_BACKEND=triton|cuda|torch`; by default Triton for CUDA tensors
and the PyTorch reference elsewhere. Imports are lazy so `import kernels` never pulls in Triton.
"""

import importlib

_OPS = {
    "token_logprobs": "kernels.token_logprobs",
    "group_advantages": "kernels.group_advantages",
    "grpo_loss": "kernels.grpo_loss",
    "GRPOLossOutput": "kernels.grpo_loss",
    "sample_tokens": "kernels.sampling",
}

__all__ = list(_OPS)


def __getattr__(name):
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
