"""The machine's two ceilings, measured: device-memory copy bandwidth and bf16 matmul throughput.

Every other benchmark's GB/s and TFLOP/s are read against these (METHOD: measure the ceilings once on
the machine rather than trust the datasheet). Copy: a device-to-device `copy_` of a large buffer,
counting bytes read plus bytes written. Matmul: an n x n x n product on random data (never zeros,
which run faster), through cuBLAS.

    python bench/bench_ceilings.py [--quick | --cpu-smoke] [--out-dir bench/results]

GPU: 4 GiB copy (several times the L2), n = 8192 bf16. --cpu-smoke (automatic without a GPU): 64 MiB
copy, n = 512 fp32, so the script runs everywhere in seconds.
Output: <out-dir>/ceilings.jsonl (appended) and ceilings.md.
"""

from __future__ import annotations

import torch
from _common import base_parser, env_info, time_ms, write_jsonl, write_markdown
from flops import device_peak

COLUMNS = [
    ("what", "what"),
    ("dtype", "dtype"),
    ("size", "size"),
    ("ms_median", "ms (median)"),
    ("ms_p20", "p20"),
    ("ms_p80", "p80"),
    ("value", "measured"),
    ("unit", "unit"),
    ("datasheet", "datasheet"),
    ("pct_datasheet", "% of datasheet"),
]


def run(out_dir, quick: bool, cpu_smoke: bool) -> list[dict]:
    cuda = torch.cuda.is_available() and not cpu_smoke
    device = "cuda" if cuda else "cpu"
    env = env_info()
    peak = device_peak(env["device"]) if cuda else None
    rows = []

    nbytes = (4 << 30) if cuda else (64 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), rep_ms=50.0 if quick else 200.0)
    gbps = 2 * nbytes / (t["ms_median"] * 1e-3) / 1e9
    assert torch.equal(dst, src), "copy wrote wrong data"
    rows.append(
        {
            "topic": "ceilings",
            "what": "copy (read + write)",
            "dtype": "float32",
            "size": f"{nbytes >> 20} MiB",
            **t,
            "value": gbps,
            "unit": "GB/s",
            "datasheet": peak.hbm_gbps if peak else None,
            "pct_datasheet": 100 * gbps / peak.hbm_gbps if peak else None,
            **env,
        }
    )
    src = dst = None  # free the buffers before the matmul

    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    t = time_ms(lambda: a @ b, rep_ms=50.0 if quick else 200.0)
    tflops = 2 * n**3 / (t["ms_median"] * 1e-3) / 1e12
    ref = (a[:64].double() @ b.double()).float()
    rel = ((a[:64] @ b).float() - ref).norm() / ref.norm()
    assert rel < 2e-2, f"matmul relative error {rel:.2e} against float64"
    rows.append(
        {
            "topic": "ceilings",
            "what": "matmul",
            "dtype": str(dtype).removeprefix("torch."),
            "size": f"{n}^3",
            **t,
            "value": tflops,
            "unit": "TFLOP/s",
            "datasheet": peak.bf16_tflops if peak else None,
            "pct_datasheet": 100 * tflops / peak.bf16_tflops if peak else None,
            "rel_err_vs_fp64": float(rel),
            **env,
        }
    )
    for r in rows:
        print(f"{r['what']:20s} {r['size']:>10s}: {r['value']:10.1f} {r['unit']} ({r['ms_median']:.3f} ms)")
    write_jsonl(out_dir, "ceilings", rows)
    write_markdown(out_dir, "ceilings", "Ceilings: copy bandwidth and matmul throughput", rows, COLUMNS)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__.split("\n")[0]).parse_args(argv)
    run(args.out_dir, args.quick, args.cpu_smoke)


if __name__ == "__main__":
    main()
