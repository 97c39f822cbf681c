"""Decode throughput of `model.generate`: tokens/s and GB/s against the HBM bandwidth bound.

For each preset (random bf16 weights) and batch size, B distinct prompts of --prompt-len tokens are
sampled for --new-tokens tokens (no stop ids, so every row decodes every step). The prefill is timed
by a separate `generate(max_new_tokens=1)` call on the same prompts and subtracted, so

    decode tokens/s = B * (new_tokens - 1) / (t_generate - t_prefill)
    decode GB/s     = sum over the decode steps of flops.decode_step_bytes / the same seconds

where decode_step_bytes is the minimum a step must read from HBM: all weights once plus the K/V of
each row's valid positions (gpt-fast's "bandwidth achieved" counts the weights only; at batch 1 the
two agree within a few %). `hbm_fraction` = GB/s / the datasheet HBM bandwidth (bench/flops.py): the
issue's target is >= 70% at batch 1. The decode attention reads every slot of the static cache
(masked), so `decode_gbps_static_cache` also reports the bytes this implementation moves (the
K/V at the full cache length); at large batch the gap between the two is the cache to trim.

`--compile reduce-overhead` wraps the model in `torch.compile(mode="reduce-overhead")` (CUDA graphs)
before calling generate, which then compiles the decode forward (the prefill runs `model.hidden`
eagerly); a mode that fails is recorded with its error instead of stopping the run.

Single- vs multi-turn (the paper's efficiency argument): the same budget of --samples responses drawn
as GRPO does on expert states (samples / G prompts, one generate call, num_samples=G: one prefill per
state, all rows decode together) and as a multi-turn rollout loop does (samples / turns episodes,
--turns SEQUENTIAL generate calls of one sample per episode); env time excluded. Reported as
generated tokens/s of each and their ratio (target: single-turn end to end >= 2x).

    python bench/bench_rollout.py [--presets llama3.2-1b llama3.1-8b] [--batch 1 64 256] [--quick]
    python bench/bench_rollout.py --device cpu --quick      # tiny preset, seconds

References: gpt-fast `generate.py` (tokens/s, bandwidth achieved = model bytes x tokens/s; torch.compile
of the decode step with mode="reduce-overhead"); vLLM `benchmarks/benchmark_throughput.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import flops
import torch
from _common import (  # bench/ is sys.path[0] for scripts
    base_parser,
    env_info,
    markdown_table,
    write_jsonl,
    write_markdown,
)
from bench_train_step import build_model

from singleturn.model import PRESETS, LlamaConfig, generate

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0])  # --out-dir, --quick, --cpu-smoke
    p.add_argument("--presets", nargs="+", default=None, help=f"from {sorted(PRESETS)}")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="rows decoded together")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="bfloat16 (fp32 on CPU)")
    p.add_argument("--compile", nargs="+", default=None, choices=["none", "default", "reduce-overhead"])
    p.add_argument("--repeats", type=int, default=None, help="timed generate calls per point (median)")
    p.add_argument("--samples", type=int, default=None, help="single- vs multi-turn: samples per rollout")
    p.add_argument("--group-size", type=int, default=None, help="single-turn: G samples per state")
    p.add_argument("--turns", type=int, default=None, help="multi-turn: sequential turns per episode")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = p.parse_args(argv)
    if args.cpu_smoke:  # the kernels benchmarks' tiny-CPU flag: same as --device cpu --quick
        args.device, args.quick = "cpu", True
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if cpu:
        defaults = dict(presets=["tiny"], batch=[1, 4], prompt_len=32, new_tokens=8, compile=["none"])
        defaults.update(samples=8, group_size=4, turns=4)
        defaults.update(dtype="float32", repeats=1)  # CPU bf16 matmuls are emulated (slow)
    elif args.quick:
        defaults = dict(presets=["llama3.2-1b"], batch=[1, 64, 256], prompt_len=1024, new_tokens=64)
        defaults.update(compile=["none"], dtype="bfloat16", repeats=2, samples=256, group_size=8, turns=8)
    else:
        defaults = dict(presets=["llama3.2-1b", "llama3.1-8b"], batch=[1, 64, 256], prompt_len=1024)
        defaults.update(new_tokens=128, compile=["none", "reduce-overhead"], dtype="bfloat16", repeats=3)
        defaults.update(samples=256, group_size=8, turns=8)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.samples % args.group_size or args.samples % args.turns:
        p.error("--samples must be a multiple of --group-size and of --turns")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: time the work, not its launch


def _timed_generate(model, prompts, new_tokens: int, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new_tokens, temperature=1.0, stop_ids=(), seed=0)
    _sync(device)
    dt = time.perf_counter() - t0
    if int(out.lengths.min()) != new_tokens:  # a stop id would shorten rows and break the token count
        raise RuntimeError(f"generate returned rows shorter than {new_tokens} tokens")
    return dt


def measure_point(model, config: LlamaConfig, batch: int, args, device, hbm_gbps: float | None) -> dict:
    """Median over args.repeats of prefill and full-generate seconds -> decode tokens/s, GB/s."""
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
    _timed_generate(model, prompts, args.new_tokens, device)  # warm-up (and compilation)
    _timed_generate(model, prompts, 1, device)
    prefill, full = [], []
    for _ in range(args.repeats):
        prefill.append(_timed_generate(model, prompts, 1, device))
        full.append(_timed_generate(model, prompts, args.new_tokens, device))
    prefill_s, full_s = statistics.median(prefill), statistics.median(full)
    decode_s = max(full_s - prefill_s, 1e-9)
    steps = args.new_tokens - 1  # the first token is sampled from the prefill's logits
    nbytes = dict(
        param_bytes=model_bytes(args), kv_bytes=model_bytes(args)
    )  # the cache has the weights' dtype
    bytes_ = sum(
        flops.decode_step_bytes(config, [args.prompt_len + t] * batch, **nbytes)
        for t in range(1, args.new_tokens)
    )
    # What this implementation reads: the masked attention reads every slot of the static cache.
    static_bytes = steps * flops.decode_step_bytes(
        config, [args.prompt_len + args.new_tokens] * batch, **nbytes
    )
    gbps = bytes_ / decode_s / 1e9
    return {
        "prefill_s": prefill_s,
        "generate_s": full_s,
        "decode_s": decode_s,
        "decode_ms_per_step": decode_s / steps * 1e3,
        "decode_tokens_per_s": batch * steps / decode_s,
        "decode_gbps": gbps,
        "decode_gbps_static_cache": static_bytes / decode_s / 1e9,
        "hbm_gbps_datasheet": hbm_gbps,
        "hbm_fraction": gbps / hbm_gbps if hbm_gbps else None,
        "prefill_tokens_per_s": batch * args.prompt_len / prefill_s,
    }


def measure_single_vs_multi_turn(model, config: LlamaConfig, args, device) -> dict:
    """The same sample budget (args.samples responses of new_tokens each, prompts of prompt_len) drawn two ways.

    single-turn (GRPO on expert states): samples / G states, ONE generate call with num_samples=G,
    so each prompt is prefilled once and all samples decode together;
    multi-turn (trajectory RL): samples / turns episodes in lockstep, `turns` SEQUENTIAL generate
    calls with one sample per live episode, each turn prefilling its (new) prompt. Env time between
    turns is not included (it only widens the gap). Median of args.repeats.
    """
    gen = torch.Generator().manual_seed(7)
    n_states, n_episodes = args.samples // args.group_size, args.samples // args.turns
    states = torch.randint(0, config.vocab_size, (n_states, args.prompt_len), generator=gen).tolist()
    turns = torch.randint(
        0, config.vocab_size, (args.turns, n_episodes, args.prompt_len), generator=gen
    ).tolist()
    kw = dict(max_new_tokens=args.new_tokens, temperature=1.0, stop_ids=(), seed=0)

    def single():
        generate(model, states, num_samples=args.group_size, **kw)

    def multi():
        for prompts in turns:
            generate(model, prompts, num_samples=1, **kw)

    out = {}
    for name, fn in (("single_turn", single), ("multi_turn", multi)):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[f"{name}_s"] = statistics.median(times)
        out[f"{name}_tokens_per_s"] = args.samples * args.new_tokens / out[f"{name}_s"]
    out["single_over_multi"] = out["multi_turn_s"] / out["single_turn_s"]
    return out


def model_bytes(args) -> int:
    return torch.empty((), dtype=_DTYPES[args.dtype]).element_size()


COLUMNS = [
    ("preset", "preset"),
    ("compile", "compile"),
    ("batch", "batch"),
    ("prompt_len", "prompt"),
    ("new_tokens", "new"),
    ("decode_ms_per_step", "ms/step"),
    ("decode_tokens_per_s", "decode tok/s"),
    ("decode_gbps", "GB/s"),
    ("hbm_fraction", "of HBM"),
    ("decode_gbps_static_cache", "GB/s read (static cache)"),
    ("prefill_tokens_per_s", "prefill tok/s"),
    ("error", "error"),
]


TURN_COLUMNS = [
    ("preset", "preset"),
    ("samples", "samples"),
    ("group_size", "G"),
    ("turns", "turns"),
    ("prompt_len", "prompt"),
    ("new_tokens", "new"),
    ("single_turn_tokens_per_s", "single-turn tok/s"),
    ("multi_turn_tokens_per_s", "multi-turn tok/s"),
    ("single_over_multi", "speed-up"),
]


def main(argv=None) -> None:
    args = parse_args(argv)
    device = (
        torch.device("cpu") if args.device == "cpu" or not torch.cuda.is_available() else torch.device("cuda")
    )
    dp = flops.device_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    env, rows, turn_rows = env_info(), [], []
    for preset in args.presets:
        config = LlamaConfig.from_preset(preset)
        model = build_model(config, device).to(_DTYPES[args.dtype]).eval()
        model.requires_grad_(False)
        for mode in args.compile:
            runner = model if mode == "none" else torch.compile(model, mode=mode)
            for batch in args.batch:
                row = {**env, "bench": "rollout", "preset": preset, "compile": mode, "batch": batch}
                row.update(prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=args.dtype)
                try:
                    row.update(measure_point(runner, config, batch, args, device, dp and dp.hbm_gbps))
                    print(
                        f"[rollout] {preset} compile={mode} B={batch}: {row['decode_ms_per_step']:.2f} ms/step, "
                        f"{row['decode_tokens_per_s']:.0f} tok/s, {row['decode_gbps']:.0f} GB/s",
                        flush=True,
                    )
                except Exception as e:  # one failing point (OOM, compile) must not stop the rest
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    print(f"[rollout] {preset} compile={mode} B={batch}: FAILED {row['error']}", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
        turn_row = {**env, "bench": "rollout_turns", "preset": preset, "samples": args.samples}
        turn_row.update(group_size=args.group_size, turns=args.turns, prompt_len=args.prompt_len)
        turn_row.update(new_tokens=args.new_tokens, dtype=args.dtype)
        turn_row.update(measure_single_vs_multi_turn(model, config, args, device))
        print(
            f"[rollout] {preset} {args.samples} samples: single-turn (G={args.group_size}) "
            f"{turn_row['single_turn_tokens_per_s']:.0f} tok/s, multi-turn ({args.turns} turns) "
            f"{turn_row['multi_turn_tokens_per_s']:.0f} tok/s: {turn_row['single_over_multi']:.2f}x",
            flush=True,
        )
        turn_rows.append(turn_row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_jsonl(args.out_dir, "rollout", rows + turn_rows)
    write_markdown(args.out_dir, "rollout", "Decode throughput of model.generate", rows, COLUMNS)
    write_markdown(
        args.out_dir, "rollout_turns", "Single-turn vs multi-turn rollout", turn_rows, TURN_COLUMNS
    )
    print(f"\n{markdown_table(rows, COLUMNS)}\n\n{markdown_table(turn_rows, TURN_COLUMNS)}", flush=True)


if __name__ == "__main__":
    main()
