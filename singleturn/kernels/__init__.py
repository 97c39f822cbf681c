"""Fused ops for single-turn RL: log-probs over action tokens, GRPO advantages and loss, sampling.

Each op lives in its own module (Triton kernel + PyTorch reference + autograd wrapper + one public
function). Backend choice: `KERNELS_BACKEND=triton|cuda|torch`; by default Triton for CUDA tensors
and the PyTorch reference elsewhere. The op modules import Triton (and build the CUDA extension)
only when a kernel is launched, so `import singleturn.kernels` stays cheap on CPU-only installs.

The functions are imported eagerly on purpose: each module shares its op's name, and importing a
submodule binds the module object onto the package, which would shadow a lazily exported function.
"""

from singleturn.kernels.group_advantages import group_advantages
from singleturn.kernels.grpo_loss import GRPOLossOutput, grpo_loss
from singleturn.kernels.sampling import sample_tokens
from singleturn.kernels.token_logprobs import token_logprobs

__all__ = ["GRPOLossOutput", "group_advantages", "grpo_loss", "sample_tokens", "token_logprobs"]
