"""Peak memory and wall-clock of one GRPO rollout batch with and without `rollout.max_cache_mb`.

`generate` allocates a static KV cache of every row (states x G) at the batch's longest prompt; with
a bound (`max_cache_bytes`) it decodes consecutive chunks of whole prompts whose cache fits. Each
bound runs in a fresh child process (so the peak RSS, `ru_maxrss`, is that bound's alone): random
weights of a preset in --dtype, --states prompts whose lengths are drawn uniformly from
[--min-len, --max-len] (seeded; SmolLM2's single-turn prompts run 300-1,900 ids, median ~500), G
samples of --new-tokens each, no stop ids. Rows: bound, chunks, the largest cache one chunk
allocates (`kv_cache_bytes`), peak RSS (and peak CUDA allocation with --device cuda), wall-clock of the generate call (median of --reps), and
the ratio to the unbounded run.

    python bench/bench_rollout_memory.py                       # smollm2-135m, 32 states x 8, bf16
    python bench/bench_rollout_memory.py --cpu-smoke           # tiny preset, seconds
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import base_parser, env_info, write_jsonl, write_markdown

from singleturn.model import LlamaConfig, Transformer
from singleturn.model.generate import generate, kv_cache_bytes, plan_chunks

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def child(args) -> dict:
    config = LlamaConfig.preset(args.preset)
    model = Transformer(config)
    model.init_weights(0)
    model = model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.states,), generator=g).tolist()
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in lens]
    bound = args.child << 20
    chunks = plan_chunks(model, prompts, args.group_size, args.new_tokens, bound)
    biggest = max(
        kv_cache_bytes(model, (b - a) * args.group_size, max(lens[a:b]) + args.new_tokens) for a, b in chunks
    )
    cuda = args.device == "cuda"
    times = []
    for _ in range(args.reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(
            model, prompts, num_samples=args.group_size, max_new_tokens=args.new_tokens,
            temperature=1.0, seed=0, max_cache_bytes=bound,
        )  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "preset": args.preset,
        "dtype": args.dtype,
        "states": args.states,
        "group_size": args.group_size,
        "new_tokens": args.new_tokens,
        "longest_prompt": max(lens),
        "median_prompt": int(statistics.median(lens)),
        "max_cache_mb": args.child,
        "chunks": len(chunks),
        "largest_cache_gib": biggest / 2**30,
        "device": args.device,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "generate_s": statistics.median(times),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--states", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--min-len", type=int, default=300)
    p.add_argument("--max-len", type=int, default=1900)
    p.add_argument("--bounds", type=int, nargs="+", default=[0, 8192, 4096, 2048], help="MiB; 0 = none")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--child", type=int, default=None, help="internal: run one bound (MiB) in this process")
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    if args.cpu_smoke:
        args.preset, args.states, args.min_len, args.max_len, args.bounds = "tiny", 8, 20, 60, [0, 2]
    rows = []
    for bound in args.bounds:
        argv = [sys.executable, __file__, "--child", str(bound)]
        for k in (
            "device",
            "preset",
            "dtype",
            "states",
            "group_size",
            "new_tokens",
            "min_len",
            "max_len",
            "reps",
        ):
            argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"bench_rollout_memory: bound {bound} MiB failed:\n{proc.stderr[-2000:]}")
        out = proc.stdout.strip().splitlines()[-1]
        row = {**env_info(), **json.loads(out)}  # the child's device wins over the host's arch
        rows.append(row)
        print(
            json.dumps(
                {
                    k: row[k]
                    for k in ("max_cache_mb", "chunks", "largest_cache_gib", "peak_rss_gib", "generate_s")
                }
            )
        )
    base = rows[0]
    for r in rows:
        r["rss_vs_first"] = r["peak_rss_gib"] / base["peak_rss_gib"]
        r["time_vs_first"] = r["generate_s"] / base["generate_s"]
    columns = [
        ("max_cache_mb", "max_cache_mb"),
        ("chunks", "chunks"),
        ("largest_cache_gib", "largest cache GiB"),
        ("peak_rss_gib", "peak RSS GiB"),
        ("peak_cuda_gib", "peak CUDA GiB"),
        ("rss_vs_first", "RSS / first"),
        ("generate_s", "generate s"),
        ("time_vs_first", "time / first"),
    ]
    topic = "rollout_memory"
    write_jsonl(args.out_dir, topic, rows)
    write_markdown(
        args.out_dir,
        topic,
        f"One rollout batch, {base['preset']} {base['dtype']}: {base['states']} states x G {base['group_size']}, "
        f"prompts {args.min_len}-{args.max_len} ids (longest {base['longest_prompt']}), {base['new_tokens']} new tokens",
        rows,
        columns,
    )


if __name__ == "__main__":
    main()
