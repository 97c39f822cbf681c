"""Benchmark kernels.sample_tokens: the fused CUDA kernel (csrc/) vs the PyTorch reference (sort-based top-p).

Providers: `cuda` (torch.ops.singleturn_rl.sample_tokens, built by kernels/_csrc.py) and `torch`
(kernels.sampling.sample_tokens_reference: softmax, sort for top-p, cumsum draw). Reported: median /
p20 / p80 ms per call (L2 flushed before each rep, see bench/_common.py), GB/s of logits read once
(B * V * itemsize / time), % of the HBM peak when the device is known, and the speedup over torch.
The issue's targets: >= 80% of HBM bandwidth for B >= 64 and >= 5x the reference.

    python bench/bench_sampling.py [--quick | --cpu-smoke] [--out-dir bench/results]

GPU sweep: B in {1, 64, 256, 1024}, V = 128256 (LLaMA-3), bf16 and fp32 logits, three truncation
settings. --quick: bf16, B in {1, 64, 1024}, nucleus sampling. --cpu-smoke (automatic without a GPU):
the reference alone, B = 1. Output: <out-dir>/sampling.jsonl (appended) and sampling.md.
"""

from __future__ import annotations

import functools

import torch
from _common import base_parser, env_info, time_ms, write_jsonl, write_markdown

from singleturn.kernels import _csrc
from singleturn.kernels.sampling import sample_tokens_reference

V = 128256
# (temperature, top_p, top_k): plain softmax sampling, nucleus, top-k + nucleus.
SETTINGS = [(1.0, 1.0, 0), (1.0, 0.95, 0), (0.7, 0.9, 50)]
HBM_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # SXM parts; None elsewhere
COLUMNS = [
    ("provider", "provider"),
    ("dtype", "dtype"),
    ("B", "B"),
    ("V", "V"),
    ("temperature", "T"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("ms_median", "ms"),
    ("ms_p20", "p20"),
    ("ms_p80", "p80"),
    ("gbps", "GB/s"),
    ("hbm_pct", "% HBM"),
    ("speedup_vs_torch", "x vs torch"),
]


def _hbm_peak(device_name: str) -> float | None:
    return next((v for k, v in HBM_PEAK_GBPS.items() if k in device_name), None)


def run(out_dir, quick: bool, cpu_smoke: bool) -> list[dict]:
    cuda = torch.cuda.is_available() and not cpu_smoke
    device = "cuda" if cuda else "cpu"
    have_op = cuda and _csrc.load()
    if cuda:
        batches, dtypes = (
            ([1, 64, 1024], [torch.bfloat16])
            if quick
            else ([1, 64, 256, 1024], [torch.bfloat16, torch.float32])
        )
        settings = SETTINGS[1:2] if quick else SETTINGS
    else:
        batches, dtypes, settings = [1], [torch.bfloat16], SETTINGS[1:2]
    env = env_info()
    peak = _hbm_peak(env["device"]) if cuda else None
    rows = []
    for dtype in dtypes:
        for B in batches:
            logits = torch.randn(B, V, device=device).mul_(3).to(dtype)  # (B, V)
            gbytes = logits.numel() * logits.element_size() / 1e9
            for T, top_p, top_k in settings:
                providers = {
                    "torch": functools.partial(
                        sample_tokens_reference, logits, temperature=T, top_p=top_p, top_k=top_k
                    )
                }
                if have_op:
                    providers["cuda"] = functools.partial(
                        torch.ops.singleturn_rl.sample_tokens, logits, T, top_p, top_k, 0, 0
                    )
                timings = {
                    name: time_ms(fn, rep_ms=20.0 if quick or not cuda else 100.0)
                    for name, fn in providers.items()
                }
                for name, t in timings.items():
                    gbps = gbytes / (t["ms_median"] / 1e3)
                    row = {
                        "topic": "sampling",
                        "provider": name,
                        "dtype": str(dtype).removeprefix("torch."),
                        "B": B,
                        "V": V,
                        "temperature": T,
                        "top_p": top_p,
                        "top_k": top_k,
                        **t,
                        "gbps": gbps,
                        "hbm_pct": 100.0 * gbps / peak if peak else None,
                        "speedup_vs_torch": timings["torch"]["ms_median"] / t["ms_median"],
                        **env,
                    }
                    rows.append(row)
                    print(
                        f"{name:5s} {row['dtype']:8s} B={B:5d} T={T} top_p={top_p} top_k={top_k:3d}: "
                        f"{t['ms_median']:9.3f} ms [{t['ms_p20']:.3f}, {t['ms_p80']:.3f}] {gbps:9.2f} GB/s "
                        f"x{row['speedup_vs_torch']:.1f}"
                    )
            del logits
    write_jsonl(out_dir, "sampling", rows)
    note = (
        ""
        if have_op
        else (" (CUDA op not built: reference only)" if cuda else " (CPU smoke: reference only)")
    )
    write_markdown(
        out_dir, "sampling", f"sample_tokens: fused CUDA kernel vs PyTorch reference{note}", rows, COLUMNS
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__.split("\n")[0]).parse_args(argv)
    run(args.out_dir, args.quick, args.cpu_smoke)


if __name__ == "__main__":
    main()
