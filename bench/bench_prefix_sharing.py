"""Prefix sharing and token packing: forward + backward of a training loss, packed rows vs padded rows.

Two jobs, each timed as the two layouts the trainer can feed `model.hidden`:
- grpo: one GRPO group (a prompt of ~300 tokens, G responses of ~8) through the fused GRPO loss
  (`kernels.grpo_loss`, summed over the response tokens, backward into every parameter).
  `padded` is today's trainer layout (`trainer.data.pack_completions`: G right-padded rows, the
  prompt copied into each); `shared` is `model.masks.build_shared_prefix_batch`: one row
  [prompt | r_1 | ... | r_G] under the tree mask, the prompt computed once.
- sft: one SFT micro-batch (ragged prompts of ~300 tokens, ~8 target tokens) through the NLL of
  `kernels.token_logprobs`. `padded` = `pack_completions`; `packed` / `packed-rowsN` =
  `model.masks.build_packed_causal_batch` in one row / in rows of at most N tokens (first fit decreasing).
Model shapes with random weights: `tiny-cpu` (the default `make train` model: dim 64, 3 layers, 2 heads,
vocab 1024) and `smollm2-135m` (30 layers, dim 576, 9 heads, 3 KV heads, ffn 1536, vocab 49152, tied).
Dtypes: float32, and bfloat16 autocast (fp32 weights, as the trainer's CPU default keeps them).

Reported per (model, dtype, job, G, layout): tokens computed (B x T, padding included) and useful
tokens, wall time (median, p20/p80 of `--reps`; the first run is a warm-up under the memory probe and
not timed), peak memory above the model (CPU: the profiler's allocator events; CUDA: max allocated),
the loss (the layouts must agree), and against `padded`: tokens_ratio, speedup, mem_ratio.
The layouts of one configuration run interleaved in one process (`_common.time_interleaved`), so on
shared cores the absolute times are noisy but the ratio is the measurement.

    python bench/bench_prefix_sharing.py --model smollm2-135m --group-size 8 [--dtype float32 bfloat16]
    python bench/bench_prefix_sharing.py --quick        # device_run.sh: smollm2-135m, G=8, bf16
    python bench/bench_prefix_sharing.py --cpu-smoke    # tiny shapes, seconds (tests/bench)

On CUDA the packed layouts run FlexAttention (compiled; the first call per shape compiles, in the
warm-up). Output: <out-dir>/prefix_sharing_<cpu|cuda>.jsonl (appended) and .md (every run in the JSONL).
"""

from __future__ import annotations

import contextlib
import json
import random
import shlex
import sys
from pathlib import Path

import torch
from _common import base_parser, env_info, markdown_table, peak_memory_bytes, time_interleaved, write_jsonl

from singleturn.kernels.grpo_loss import grpo_loss
from singleturn.kernels.token_logprobs import token_logprobs
from singleturn.model import LlamaConfig, Transformer, build_packed_causal_batch, build_shared_prefix_batch
from singleturn.trainer.data import pack_completions

MODELS = {
    "tiny-cpu": dict(dim=64, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=192, vocab_size=1024),
    "smollm2-135m": dict(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152, rope_theta=100000.0
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COLUMNS = [
    ("model", "model"),
    ("n_layers", "layers"),
    ("dtype", "dtype"),
    ("job", "job"),
    ("G", "G"),
    ("layout", "layout"),
    ("shape", "B x T"),
    ("tokens_computed", "tokens computed"),
    ("tokens_useful", "useful"),
    ("ms_median", "ms"),
    ("ms_p20", "p20"),
    ("ms_p80", "p80"),
    ("mem_peak_mb", "peak MB"),
    ("tokens_ratio", "tokens ratio"),
    ("speedup", "speedup"),
    ("mem_ratio", "mem ratio"),
    ("loss_rel_diff", "loss rel diff"),
]


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--group-size", nargs="+", type=int, default=None, help="G (default 4 8 16)")
    p.add_argument("--jobs", nargs="+", choices=["grpo", "sft"], default=["grpo", "sft"])
    p.add_argument("--prompt-len", type=int, default=None, help="GRPO prompt tokens (default 300)")
    p.add_argument("--response-len", type=int, default=8, help="mean response tokens (drawn in [n-2, n+2])")
    p.add_argument("--sft-examples", type=int, default=8, help="examples in the SFT micro-batch")
    p.add_argument("--sft-row-len", nargs="+", type=int, default=[0, 640], help="packed rows (0: one row)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per layout (default 3)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--n-layers", type=int, default=None, help="override the layer count (the widths stay)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    smoke, quick = args.cpu_smoke, args.quick
    args.model = args.model or (["tiny-cpu"] if smoke else ["smollm2-135m"] if quick else list(MODELS))
    args.dtype = args.dtype or (["float32"] if smoke else ["bfloat16"] if quick else ["float32", "bfloat16"])
    args.group_size = args.group_size or ([4] if smoke else [8] if quick else [4, 8, 16])
    args.prompt_len = args.prompt_len or (40 if smoke else 300)
    args.reps = args.reps or (1 if smoke else 3)
    if smoke or quick:  # one packed SFT variant: on CUDA each new row shape is another flex compile
        args.sft_row_len = [0]
    if smoke:
        args.sft_examples = min(args.sft_examples, 4)
    return args


def build_model(name: str, device: str, seed: int, n_layers: int | None = None) -> Transformer:
    shape = dict(MODELS[name], **({"n_layers": n_layers} if n_layers else {}))
    config = LlamaConfig(**shape, tie_word_embeddings=True, norm_eps=1e-5)
    model = Transformer(config)
    model.init_weights(seed)
    return model.to(device)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def grpo_layouts(model, group, device) -> dict:
    """name -> (build the layout, then the loss of one group: forward + backward)."""
    prompt, responses = group
    G, W = len(responses), model.output.weight
    n_tok = sum(len(r) for r in responses)
    gen = torch.Generator().manual_seed(len(prompt) * 1000 + G)
    adv_G = torch.randn(G, generator=gen)  # one advantage per response
    seq = torch.tensor([j for j, r in enumerate(responses) for _ in r])
    adv_N = adv_G[seq].to(device)
    with torch.no_grad():  # old log-probs = the current ones (the first epoch: ratio 1, unclipped)
        (mb,) = build_shared_prefix_batch([group], max_tokens=1 << 30, device=device)
        h = model.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask)
        old_N = token_logprobs(h[mb.rows, mb.cols], W, mb.targets)  # (N,) fp32
    assert old_N.numel() == n_tok

    def loss_of(h, rows, cols, targets):
        return grpo_loss(h[rows, cols], W, targets, adv_N, old_N).loss

    def padded():
        pb = pack_completions([prompt] * G, responses, pad_id=0, device=device)
        return pb, model.hidden(pb.tokens), pb

    def shared():
        (mb,) = build_shared_prefix_batch([group], max_tokens=1 << 30, device=device)
        return mb, model.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask), mb

    return {"padded": (padded, loss_of), "shared": (shared, loss_of)}


def sft_layouts(model, examples, row_lens, device) -> dict:
    W = model.output.weight

    def loss_of(h, rows, cols, targets):
        return -token_logprobs(h[rows, cols], W, targets).sum()

    def padded():
        pb = pack_completions([p for p, _ in examples], [c for _, c in examples], pad_id=0, device=device)
        return pb, model.hidden(pb.tokens), pb

    def packed(row_len):
        def run():
            (mb,) = build_packed_causal_batch(
                examples, max_tokens=1 << 30, row_len=row_len or None, order="length", device=device
            )
            return mb, model.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask), mb

        return run

    out = {"padded": (padded, loss_of)}
    for r in row_lens:
        out["packed" if r == 0 else f"packed-rows{r}"] = (packed(r), loss_of)
    return out


def measure(model, layouts: dict, useful: int, dtype, device, reps: int) -> list[dict]:
    """Each layout: one warm-up under the memory probe, then `reps` interleaved timed runs.

    useful: the distinct tokens the job needs (the prompt once + the responses; every example once).
    """
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        if dtype == torch.bfloat16
        else contextlib.nullcontext()
    )
    info: dict[str, dict] = {}

    def step_of(name):
        build_forward, loss_of = layouts[name]

        def step():
            with autocast:
                batch, h, mb = build_forward()
                loss = loss_of(h, mb.rows, mb.cols, mb.targets)
            loss.backward()
            model.zero_grad(set_to_none=True)
            info[name] = {
                "shape": "x".join(map(str, batch.tokens.shape)),
                "tokens_computed": int(batch.tokens.numel()),
                "tokens_useful": useful,
                "loss": float(loss.detach()),  # host sync, once per step
            }

        return step

    steps = {name: step_of(name) for name in layouts}
    mem = {name: peak_memory_bytes(step, device) for name, step in steps.items()}  # = the warm-up
    times = time_interleaved(steps, reps=reps)
    rows = []
    base = None
    for name in layouts:
        row = {"layout": name, **info[name], **times[name], "mem_peak_mb": mem[name] / 2**20}
        if base is None:
            base = row
        else:
            row["tokens_ratio"] = base["tokens_computed"] / row["tokens_computed"]
            row["speedup"] = base["ms_median"] / row["ms_median"]
            row["mem_ratio"] = base["mem_peak_mb"] / max(row["mem_peak_mb"], 1e-9)
            row["loss_rel_diff"] = abs(row["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-30)
        rows.append(row)
    return rows


def job_configs(args, model, rng: random.Random) -> list[tuple]:
    """(job, G, useful tokens, layouts) for this model: one GRPO group per G, one SFT micro-batch."""
    vocab = model.config.vocab_size
    r_lo, r_hi = max(1, args.response_len - 2), args.response_len + 2
    configs = []
    if "grpo" in args.jobs:
        for G in args.group_size:
            prompt = _tokens(rng, args.prompt_len, vocab)
            group = (prompt, [_tokens(rng, rng.randint(r_lo, r_hi), vocab) for _ in range(G)])
            useful = len(prompt) + sum(map(len, group[1]))
            configs.append(("grpo", G, useful, grpo_layouts(model, group, args.device)))
    if "sft" in args.jobs:
        lo, hi = (2 * args.prompt_len) // 3, (4 * args.prompt_len) // 3
        examples = [
            (_tokens(rng, rng.randint(lo, hi), vocab), _tokens(rng, rng.randint(r_lo, r_hi), vocab))
            for _ in range(args.sft_examples)
        ]
        useful = sum(len(p) + len(c) for p, c in examples)
        configs.append(("sft", None, useful, sft_layouts(model, examples, args.sft_row_len, args.device)))
    return configs


ENV_KEYS = (
    "device",
    "cpu",
    "cpu_count",
    "cpu_isa",
    "threads",
    "torch",
    "triton",
    "cuda",
    "git_sha",
    "timestamp",
)


def write_report(out_dir, topic: str, rows: list[dict]) -> Path:
    """Append rows to <topic>.jsonl; rewrite <topic>.md from every run in that file (one section
    per run: its command, its environment, its table), so separate runs accumulate."""
    path = write_jsonl(out_dir, topic, rows)
    runs: dict[tuple, list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            runs.setdefault((r.get("timestamp"), r.get("command")), []).append(r)
    parts = ["# Prefix sharing and token packing: forward + backward, packed vs padded rows\n"]
    for (_, command), run in runs.items():
        env = ", ".join(f"{k} {run[0].get(k)}" for k in ENV_KEYS)
        parts.append(f"## `{command}`\n\n{env}\n\n{markdown_table(run, COLUMNS)}\n")
    md = Path(out_dir) / f"{topic}.md"
    md.write_text("\n".join(parts))
    return md


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        # On oversubscribed cores (a shared CI box) every OpenMP barrier waits for a time slice: with 2
        # threads a tiny model's step was measured 140x slower than with 1; one thread avoids that.
        torch.set_num_threads(args.threads)
    env = env_info()
    env["threads"] = torch.get_num_threads()
    env["cpu_isa"] = torch.backends.cpu.get_cpu_capability()  # AVX2 has no native bf16 GEMM
    env["command"] = "python bench/bench_prefix_sharing.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    rng = random.Random(args.seed)
    rows = []
    for model_name in args.model:
        model = build_model(model_name, args.device, args.seed, args.n_layers)
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            for job, G, useful, layouts in job_configs(args, model, rng):
                for row in measure(model, layouts, useful, dtype, args.device, args.reps):
                    row = {
                        **env,
                        "bench": "prefix_sharing",
                        "model": model_name,
                        "dtype": dtype_name,
                        "autocast": dtype == torch.bfloat16,
                        "job": job,
                        "G": G,
                        "n_layers": model.config.n_layers,
                        "prompt_len": args.prompt_len,
                        **row,
                    }
                    rows.append(row)
                    print(
                        f"[{model_name} L{row['n_layers']} {dtype_name} {job} G={G}] {row['layout']:16s} "
                        f"{row['shape']:>9s} tokens {row['tokens_computed']:6d} {row['ms_median']:9.1f} ms "
                        f"(p20 {row['ms_p20']:.1f}, p80 {row['ms_p80']:.1f}) peak {row['mem_peak_mb']:.0f} MB"
                        + (
                            f"  speedup {row['speedup']:.2f}x tokens {row['tokens_ratio']:.2f}x"
                            if "speedup" in row
                            else ""
                        ),
                        flush=True,
                    )
        del model
    # One file per device kind, so a GPU run (device_run.sh) never mixes into the CPU measurements.
    md = write_report(args.out_dir, f"prefix_sharing_{torch.device(args.device).type}", rows)
    print(md.read_text())


if __name__ == "__main__":
    main()
