"""singleturn-rl: single-turn RL (expert-match GRPO) for LLaMA-3 agents on ALFWorld.

One import namespace for everything the project installs:
- `singleturn.kernels`: fused ops (token log-probs, GRPO advantages and loss, sampling), Triton + CUDA;
- `singleturn.model`: a minimal LLaMA-3 (HF checkpoints, GGUF conversion, tokenizer, generation);
- `singleturn.trainer`: the trainer (`torchrun trainer/main.py` from the repository root);
- `singleturn.harness`: ALFWorld games, experts, env workers and evaluation (`python -m singleturn.harness`).
"""

__version__ = "0.1.0"
