"""Model FLOPs and bytes for LLaMA-3 (MFU and bandwidth roofline), a device-peak table, a measured peak.

MFU = model FLOPs per second / the device's bf16 dense peak. "Model FLOPs" are the FLOPs the
algorithm needs, counted from `LlamaConfig` (never from what a kernel happens to execute):

- every matmul of the blocks: 2 * (weights of wq, wk, wv, wo, w1, w2, w3) per real token
  (padding tokens of a right-padded batch are NOT counted: padding is waste and lowers MFU);
- attention: QK^T and PV, 2 * 2 * n_heads * head_dim per (query, key) pair. Causal attention
  only needs the T * (T + 1) / 2 pairs at or below the diagonal, so that is what `causal=True`
  counts (torchtitan and the PaLM appendix count all T^2 pairs, which inflates MFU at long
  contexts; `causal=False` gives their number for comparison);
- the LM head, 2 * dim * vocab per token that goes through it: the trainer only computes
  log-probs of response tokens (`kernels.token_logprobs` over the gathered hidden states), so
  the head is counted on those tokens only;
- norms, RoPE, SiLU, softmax and the embedding gather are ignored (< 1% at these shapes);
- backward = 2 x forward (PaLM convention), so a training step is 3 x the forward FLOPs
  (activation recomputation is not model FLOPs).

Decode is memory bound: `decode_step_bytes` is what one decode step must read from HBM at least
(all weights once, the KV cache of the valid positions of every row), the bound that gpt-fast's
"bandwidth achieved" numbers use.

References: PaLM (Chowdhery et al. 2022), appendix B (MFU); torchtitan `utils.get_peak_flops`,
`models/llama3/model.py: get_nparams_and_flops`; gpt-fast `generate.py` (model bytes x tokens/s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from singleturn.model.config import LlamaConfig

__all__ = [
    "DevicePeak",
    "DEVICE_PEAKS",
    "device_peak",
    "block_matmul_params",
    "attention_flops",
    "forward_flops",
    "train_flops",
    "prefill_flops",
    "decode_step_flops",
    "decode_step_bytes",
    "measured_matmul_peak_tflops",
]


@dataclass(frozen=True)
class DevicePeak:
    """Vendor datasheet numbers: dense (no sparsity) bf16 tensor-core TFLOP/s and HBM GB/s (1e9 B/s)."""

    bf16_tflops: float
    hbm_gbps: float


# Keys are matched as substrings of torch.cuda.get_device_name() (longest key first), so
# "NVIDIA H100 80GB HBM3" -> "H100" (SXM) while "NVIDIA H100 PCIe" -> "H100 PCIe".
DEVICE_PEAKS: dict[str, DevicePeak] = {
    "H100": DevicePeak(989.4, 3350.0),  # SXM5 80 GB HBM3
    "H100 PCIe": DevicePeak(756.0, 2000.0),
    "H100 NVL": DevicePeak(835.0, 3900.0),
    "H200": DevicePeak(989.4, 4800.0),
    "GH200": DevicePeak(989.4, 4000.0),  # 96 GB HBM3 variant
    "B200": DevicePeak(2250.0, 8000.0),
    "A100": DevicePeak(312.0, 2039.0),  # SXM4 80 GB
    "A100-SXM4-40GB": DevicePeak(312.0, 1555.0),
    "A100-PCIE-40GB": DevicePeak(312.0, 1555.0),
    "L40S": DevicePeak(362.0, 864.0),
    "MI300X": DevicePeak(1307.4, 5300.0),
}


def device_peak(device_name: str) -> DevicePeak | None:
    """The table entry whose key is the longest substring of `device_name`; None if unknown (e.g. CPU)."""
    hits = [k for k in DEVICE_PEAKS if k.lower() in device_name.lower()]
    return DEVICE_PEAKS[max(hits, key=len)] if hits else None


def block_matmul_params(config: LlamaConfig) -> int:
    """Weights every token multiplies through in the transformer blocks (no embedding, no LM head)."""
    c = config
    attn = (
        c.dim * c.n_heads * c.head_dim
        + 2 * c.dim * c.n_kv_heads * c.head_dim
        + c.n_heads * c.head_dim * c.dim
    )
    ffn = 3 * c.dim * c.ffn_dim
    return c.n_layers * (attn + ffn)


def attention_flops(
    config: LlamaConfig, q_len: int, *, kv_len: int | None = None, causal: bool = True
) -> int:
    """Forward FLOPs of QK^T and PV, all layers, for q_len queries that see a prefix of kv_len keys.

    kv_len None: self-attention over one sequence (kv_len = q_len). With causal=True query i (of the
    last q_len positions of a kv_len context) sees kv_len - q_len + i + 1 keys.
    """
    kv_len = q_len if kv_len is None else kv_len
    if causal:
        pairs = q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2
    else:
        pairs = q_len * kv_len
    return 4 * config.n_layers * config.n_heads * config.head_dim * pairs


def forward_flops(
    config: LlamaConfig, seq_lens: Sequence[int], *, head_tokens: int, causal: bool = True
) -> int:
    """Forward FLOPs of sequences of the given (real, unpadded) lengths, LM head on head_tokens tokens."""
    total_tokens = sum(seq_lens)
    flops = 2 * block_matmul_params(config) * total_tokens
    flops += sum(attention_flops(config, t, causal=causal) for t in seq_lens)
    return flops + 2 * config.dim * config.vocab_size * head_tokens


def train_flops(
    config: LlamaConfig, seq_lens: Sequence[int], *, head_tokens: int, causal: bool = True
) -> int:
    """Forward + backward model FLOPs (3 x forward) of one pass over the sequences."""
    return 3 * forward_flops(config, seq_lens, head_tokens=head_tokens, causal=causal)


def prefill_flops(config: LlamaConfig, prompt_lens: Sequence[int]) -> int:
    """Forward FLOPs of a prefill: every prompt position, the LM head on each prompt's last position."""
    return forward_flops(config, prompt_lens, head_tokens=len(prompt_lens))


def decode_step_flops(config: LlamaConfig, context_lens: Sequence[int]) -> int:
    """Forward FLOPs of one decode step: one new token per row, row r attending to context_lens[r] keys."""
    rows = len(context_lens)
    flops = 2 * (block_matmul_params(config) + config.dim * config.vocab_size) * rows
    return flops + sum(attention_flops(config, 1, kv_len=n) for n in context_lens)


def decode_step_bytes(
    config: LlamaConfig, context_lens: Sequence[int], *, param_bytes: int = 2, kv_bytes: int = 2
) -> int:
    """Minimum HBM bytes one decode step reads: every weight once (+ the embedding rows it looks up),
    and the K and V of the valid positions (context_lens[r], the new one included) of every row."""
    c = config
    weights = block_matmul_params(c) + c.dim * c.vocab_size  # blocks + LM head
    weights += (2 * c.n_layers + 1) * c.dim  # RMSNorm weights
    if not c.tie_word_embeddings:  # a tied head already read the table; untied: one row per token
        weights += c.dim * len(context_lens)
    kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * sum(context_lens)
    return weights * param_bytes + kv * kv_bytes


def measured_matmul_peak_tflops(
    device: torch.device | str, *, dtype: torch.dtype = torch.bfloat16, n: int = 8192
) -> float:
    """Achieved TFLOP/s of an n x n x n matmul on `device` (median of timed runs via bench/_common.py).

    The MFU denominator the benchmarks report beside the datasheet peak: clocks, power caps and
    cuBLAS heuristics put real H100 SXM bf16 GEMMs at roughly 650-800 of the 989 datasheet TFLOP/s.
    """
    from _common import time_ms  # bench/ is sys.path[0] when a benchmark script runs

    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), generator=gen, device=device).to(dtype)
    b = torch.randn((n, n), generator=gen, device=device).to(dtype)
    ms = time_ms(lambda: a @ b)["ms_median"]
    return 2 * n**3 / (ms * 1e-3) / 1e12
