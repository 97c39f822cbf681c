"""Train-step throughput per GPU: one GRPO (and one SFT) optimizer step on synthetic states.

The step runs the trainer's own code at realistic shapes (prompts of 1024-2048 tokens, responses of
32-256 tokens, G = 8) on random weights of a named preset (no download): hand FSDP
(`trainer.fsdp.apply_fsdp`, bf16 params / fp32 reduce by default), rollout with the gathered bf16
weights (`model.generate`, static KV cache, each prompt prefilled once), the GRPO loss over the
response tokens and AdamW on the fp32 shards through the trainer's one policy update
(`trainer.update.policy_update`, the function every RL stage calls). Rewards are
synthetic (half of every group right), so every group has reward variance and every sampled sequence
trains; responses run to max_new_tokens (no stop ids), so the shapes are exactly the ones asked for.

Reported per configuration (median of the timed steps; burn-in steps excluded; rank 0 prints):
- tokens/s per GPU: prompt + response tokens trained (this rank's sequences) / step seconds;
- MFU: model FLOPs (bench/flops.py: forward + backward, causal attention, LM head on the response
  tokens only) / seconds / peak, against the datasheet peak and a measured bf16 matmul peak;
  `mfu_train` counts the training phases only, `mfu_step` the whole step (rollout forward FLOPs too);
- peak memory (max over ranks); the time split: rollout = gather of the bf16 weights + prefill +
  decode (the prefill is measured by a separate `generate(max_new_tokens=1)` probe that is not
  part of the step: "decode" = rollout - gather - prefill), ref log-probs (kl_coef > 0; the old
  log-probs come from the sampler for free), forward/backward, optimizer, "other" (host work in
  between), and on CUDA with >1 rank the NCCL kernel time of one extra profiled step (it overlaps
  compute: an upper bound on the exposed communication).

    python bench/bench_train_step.py --preset llama3.2-1b [--algo grpo sft] [--quick] [--out-dir DIR]
    torchrun --nproc_per_node=8 bench/bench_train_step.py --preset llama3.1-8b
    python bench/bench_train_step.py --device cpu --quick      # tiny preset, seconds on a laptop

References: torchtitan `train.py` (tokens/s per GPU, MFU with the PaLM formula, burn-in excluded);
NeMo-RL / verl GRPO timing breakdowns (generation vs policy training vs log-prob passes).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass

import flops
import torch
import torch.distributed as dist
from _common import (  # bench/ is sys.path[0] for scripts
    base_parser,
    env_info,
    markdown_table,
    write_jsonl,
    write_markdown,
)

from singleturn.model import PRESETS, LlamaConfig, Transformer, generate
from singleturn.model.policy import DTYPES as _DTYPES
from singleturn.trainer.config import OptimConfig, build_config
from singleturn.trainer.data import Example
from singleturn.trainer.dist import destroy, init_distributed
from singleturn.trainer.fsdp import apply_fsdp
from singleturn.trainer.optim import make_optimizer, optimizer_step
from singleturn.trainer.policy_loss import Layout, select_sequences
from singleturn.trainer.stages import StageContext
from singleturn.trainer.stages.sft import sft_forward_backward
from singleturn.trainer.train import peak_memory_mb
from singleturn.trainer.update import UpdateSettings, policy_update

# Top-level phases (they add up to the step with "other") and the rollout's parts.
PHASES = ("rollout", "ref_logprobs", "fwd_bwd", "optimizer", "other")
ROLLOUT_PARTS = ("rollout_gather", "rollout_prefill", "rollout_decode")


def parse_args(argv=None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0])  # --out-dir, --quick, --cpu-smoke
    p.add_argument(
        "--preset", default=None, help=f"model preset {sorted(PRESETS)} (default: llama3.2-1b, tiny on CPU)"
    )
    p.add_argument("--algo", nargs="+", default=["grpo", "sft"], choices=["grpo", "sft"])
    p.add_argument("--prompt-len", type=int, nargs="+", default=None, help="prompt tokens (default 1024)")
    p.add_argument("--response-len", type=int, nargs="+", default=None, help="response tokens (default 128)")
    p.add_argument("--states", type=int, default=None, help="prompts (states) per rank per step (default 8)")
    p.add_argument("--group-size", type=int, default=8, help="G responses per state")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward/backward (default 8)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="> 0 builds a reference model (ref log-probs)")
    p.add_argument("--param-dtype", default=None, choices=sorted(_DTYPES), help="bfloat16 (fp32 on CPU)")
    p.add_argument("--reduce-dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--rollout-dtype", default=None, choices=sorted(_DTYPES), help="bfloat16 (fp32 on CPU)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=None, help="burn-in steps, not timed (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = p.parse_args(argv)
    if args.cpu_smoke:  # the kernels benchmarks' tiny-CPU flag: same as --device cpu --quick
        args.device, args.quick = "cpu", True
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    # Defaults: realistic on a GPU; on CPU the tiny preset at toy shapes (the scripts must not rot).
    tiny = cpu and args.preset in (None, "tiny")
    defaults = dict(
        preset="tiny" if cpu else "llama3.2-1b",
        prompt_len=[48] if tiny else [1024],
        response_len=[8] if tiny else [128],
        states=2 if tiny else (4 if args.quick else 8),
        micro_batch=4 if tiny else 8,
        warmup=1 if (tiny or args.quick) else 2,
        steps=2 if (tiny or args.quick) else 5,
        # CPU matmuls in bf16 are emulated and ~50x slower than fp32 on most CPUs.
        param_dtype="float32" if cpu else "bfloat16",
        rollout_dtype="float32" if cpu else "bfloat16",
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if tiny:
        args.group_size = min(args.group_size, 4)
    return args


def build_model(config: LlamaConfig, device: torch.device, seed: int = 0) -> Transformer:
    """Random fp32 weights drawn on the device (N(0, 0.02), norms 1), no CPU copy.

    `Transformer.init_weights` draws on the CPU for device-independent values; for an 8B model that
    takes minutes, and a benchmark only needs well-scaled random weights.
    """
    with torch.device(device):
        model = Transformer(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: phase boundaries must be measured, not queued


class PhaseTimer:
    """Wall seconds per named phase, synchronized with the device at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.t = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        _sync(self.device)
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"phase/{name}"):  # labels the phase in profiler traces
            yield
        _sync(self.device)
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class Setup:
    """Everything a step needs, built once per configuration."""

    args: argparse.Namespace
    config: LlamaConfig
    device: torch.device
    rank: int
    world: int
    model: Transformer
    fsdp: object
    optimizer: torch.optim.Optimizer
    ref: Transformer | None
    prompts: list[list[int]]
    prompt_len: int
    response_len: int


def build_setup(
    args, device: torch.device, rank: int, world: int, prompt_len: int, response_len: int
) -> Setup:
    config = LlamaConfig.from_preset(args.preset)
    model = build_model(config, device)
    kw = dict(param_dtype=_DTYPES[args.param_dtype], reduce_dtype=_DTYPES[args.reduce_dtype])
    fsdp = apply_fsdp(model, activation_checkpointing=args.activation_checkpointing, **kw)
    optimizer = make_optimizer(fsdp, OptimConfig(), lr=1e-6)
    ref = None
    if args.kl_coef > 0:
        ref = build_model(config, device, seed=1)
        ref.requires_grad_(False)
        apply_fsdp(ref, **kw)
    gen = torch.Generator().manual_seed(1000 + rank)  # distinct synthetic states per rank
    prompts = torch.randint(0, config.vocab_size, (args.states, prompt_len), generator=gen).tolist()
    return Setup(
        args, config, device, rank, world, model, fsdp, optimizer, ref, prompts, prompt_len, response_len
    )


def _optimizer_step(s: Setup) -> None:
    optimizer_step(s.fsdp, s.optimizer, lr=1e-6, grad_clip=1.0, nonfinite=0)  # the trainer's guarded step


def _context(s: Setup) -> StageContext:
    """The stage context the trainer's RL stages pass to `policy_update` (grad_clip 1.0)."""
    info = argparse.Namespace(device=s.device, rank=s.rank, world_size=s.world)
    cfg = build_config({"optim": {"grad_clip": 1.0}})
    return StageContext(
        model=s.model,
        fsdp=s.fsdp,
        tokenizer=None,
        examples=[],
        cfg=cfg,
        info=info,
        optimizer=s.optimizer,
        ref=s.ref,
    )


def _head(s: Setup):
    return lambda: s.model.output.weight  # the sticky head unit: the full weight after hidden()


def grpo_step(s: Setup, timer: PhaseTimer, step: int) -> dict:
    """One GRPO step: rollout, (ref log-probs), forward/backward over the kept sequences, AdamW."""
    a, G = s.args, s.args.group_size
    gen_kw = dict(num_samples=G, temperature=1.0, stop_ids=(), seed=step * 7919 + s.rank)
    dtype = _DTYPES[a.rollout_dtype]
    with timer("_probe"), s.fsdp.summon_full_params(dtype=dtype):  # not part of the step (see measure)
        with timer("rollout_prefill"):
            generate(s.model, s.prompts, max_new_tokens=1, **gen_kw)
    with timer("rollout"), contextlib.ExitStack() as stack:  # gather bf16 weights, sample, free them
        with timer("rollout_gather"):
            stack.enter_context(s.fsdp.summon_full_params(dtype=dtype))
        samples = generate(s.model, s.prompts, max_new_tokens=s.response_len, **gen_kw)
    lengths = samples.lengths.tolist()
    responses = samples.token_lists()
    logp = samples.logprobs.float().cpu()
    logprobs = [logp[i, :n].clone() for i, n in enumerate(lengths)]
    rewards = (torch.arange(len(responses)) % 2 == 0).float()  # half right per group: all groups kept
    batch = select_sequences(s.prompts, responses, logprobs, rewards, G)
    settings = UpdateSettings(
        layout=Layout(micro_batch_size=a.micro_batch),
        epochs=1,
        clip_eps_low=0.2,
        clip_eps_high=0.2,
        kl_coef=a.kl_coef,
        temperature=1.0,
    )
    policy_update(_context(s), batch, settings, lr=1e-6, timer=timer)
    seq_lens = [len(x.prompt) + len(x.response) for x in batch.sequences]
    resp_tokens = sum(len(x.response) for x in batch.sequences)
    c = s.config
    rollout_flops = flops.prefill_flops(c, [len(p) for p in s.prompts])
    for t in range(1, max(lengths)):  # decode steps after the prefill's first sample
        rollout_flops += flops.decode_step_flops(c, [s.prompt_len + t] * len(responses))
    train = flops.train_flops(c, seq_lens, head_tokens=resp_tokens)
    ref = flops.forward_flops(c, seq_lens, head_tokens=resp_tokens) if s.ref is not None else 0
    return {"tokens": sum(seq_lens), "train_flops": train, "other_flops": rollout_flops + ref}


def sft_step(s: Setup, timer: PhaseTimer, step: int) -> dict:
    """One SFT step over states x G sequences of prompt + response (the same tokens GRPO trains on)."""
    a = s.args
    gen = torch.Generator().manual_seed(step * 31 + s.rank)
    n = a.states * a.group_size
    targets = torch.randint(0, s.config.vocab_size, (n, s.response_len), generator=gen).tolist()
    examples = [Example(s.prompts[i // a.group_size], targets[i], {}) for i in range(n)]
    with timer("fwd_bwd"):
        sft_forward_backward(s.model, _head(s), examples, micro_batch_size=a.micro_batch, device=s.device)
    with timer("optimizer"):
        _optimizer_step(s)
    seq_lens = [len(e.prompt_ids) + len(e.target_ids) for e in examples]
    train = flops.train_flops(s.config, seq_lens, head_tokens=n * s.response_len)
    return {"tokens": sum(seq_lens), "train_flops": train, "other_flops": 0}


STEPS = {"grpo": grpo_step, "sft": sft_step}


def nccl_kernel_seconds(run_step) -> float:
    """Total NCCL kernel time (s) of one profiled call of run_step(); CUDA only (kernels may overlap compute)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_step()
    us = sum(
        e.time_range.elapsed_us()
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and "nccl" in e.name.lower()
    )
    return us * 1e-6


def _quantile(xs: list[float], q: float) -> float:
    # linear interpolation between order statistics (numpy's default); a single value is its own quantile
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1] if len(xs) > 1 else xs[0]


def _max_over_ranks(x: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())  # host sync


def measure(s: Setup, algo: str, peak_tflops: float | None, measured_tflops: float | None) -> dict:
    """Burn-in, then timed steps; the median step and phases, throughput, MFU, peak memory."""
    a, step_fn = s.args, STEPS[algo]
    runs = []
    for i in range(a.warmup + a.steps):
        if i == a.warmup and s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        timer = PhaseTimer(s.device)
        t0 = time.perf_counter()
        info = step_fn(s, timer, i)
        _sync(s.device)
        wall = time.perf_counter() - t0 - timer.t.get("_probe", 0.0)  # minus the prefill probe
        if i >= a.warmup:
            runs.append((wall, timer.t, info))
    comm = None
    if s.device.type == "cuda" and s.world > 1:
        comm = nccl_kernel_seconds(lambda: step_fn(s, PhaseTimer(s.device), a.warmup + a.steps))
    wall = statistics.median(r[0] for r in runs)
    phases = {}
    for name in PHASES[:-1] + ROLLOUT_PARTS[:-1]:
        vals = [r[1][name] for r in runs if name in r[1]]
        if vals:
            phases[name] = statistics.median(vals)
    if "rollout" in phases:
        rest = phases["rollout_prefill"] + phases["rollout_gather"]
        phases["rollout_decode"] = max(phases["rollout"] - rest, 0.0)
    # host work between the phases (unpacking samples, rewards, advantages, packing)
    phases["other"] = max(wall - sum(phases.get(k, 0.0) for k in PHASES[:-1]), 0.0)
    info = runs[0][2]
    train_s = phases["fwd_bwd"] + phases["optimizer"]
    row = {
        "bench": "train_step",
        "algo": algo,
        "preset": a.preset,
        "world_size": s.world,
        "prompt_len": s.prompt_len,
        "response_len": s.response_len,
        "states_per_rank": a.states,
        "group_size": a.group_size,
        "micro_batch": a.micro_batch,
        "param_dtype": a.param_dtype,
        "activation_checkpointing": a.activation_checkpointing,
        "kl_coef": a.kl_coef,
        "timed_steps": a.steps,
        "step_s": wall,
        "step_s_p20": _quantile([r[0] for r in runs], 0.2),
        "step_s_p80": _quantile([r[0] for r in runs], 0.8),
        "tokens_per_step_per_gpu": info["tokens"],
        "tokens_per_s_per_gpu": info["tokens"] / wall,
        "tflops_train_per_gpu": info["train_flops"] / train_s / 1e12,
        "tflops_step_per_gpu": (info["train_flops"] + info["other_flops"]) / wall / 1e12,
        "peak_tflops_datasheet": peak_tflops,
        "peak_tflops_measured": measured_tflops,
        "peak_mem_gib": _max_over_ranks(peak_memory_mb(s.device), s.device) / 1024,
        "comm_nccl_kernel_s": comm,
        **{f"time_{k}_s": v for k, v in phases.items()},
    }
    for label, peak in (("datasheet", peak_tflops), ("measured", measured_tflops)):
        for what in ("train", "step"):
            row[f"mfu_{what}_{label}"] = row[f"tflops_{what}_per_gpu"] / peak if peak else None
    return row


COLUMNS = [
    ("algo", "algo"),
    ("preset", "preset"),
    ("world_size", "GPUs"),
    ("prompt_len", "prompt"),
    ("response_len", "resp"),
    ("step_s", "step s"),
    ("tokens_per_s_per_gpu", "tok/s/GPU"),
    ("mfu_train_measured", "MFU train (meas. peak)"),
    ("mfu_train_datasheet", "MFU train (datasheet)"),
    ("mfu_step_datasheet", "MFU step (datasheet)"),
    ("peak_mem_gib", "peak GiB"),
    ("time_rollout_gather_s", "gather s"),
    ("time_rollout_prefill_s", "prefill s"),
    ("time_rollout_decode_s", "decode s"),
    ("time_ref_logprobs_s", "ref s"),
    ("time_fwd_bwd_s", "fwd+bwd s"),
    ("time_optimizer_s", "optim s"),
    ("time_other_s", "other s"),
    ("comm_nccl_kernel_s", "nccl s"),
    ("error", "error"),
]


def _run_config(args, device, info, algo, prompt_len, response_len, peak, measured) -> dict:
    """Build, measure and free one configuration; on one rank an out-of-memory becomes an error row."""
    s = None
    try:
        s = build_setup(args, device, info.rank, info.world_size, prompt_len, response_len)
        row = measure(s, algo, peak, measured)
        if info.rank == 0:
            print(
                f"[train_step] {algo} {args.preset} P={prompt_len} R={response_len} x{info.world_size}: "
                f"{row['step_s']:.3f} s/step, {row['tokens_per_s_per_gpu']:.0f} tok/s/GPU, "
                f"peak {row['peak_mem_gib']:.2f} GiB",
                flush=True,
            )
    except torch.OutOfMemoryError as e:
        if info.world_size > 1:  # the other ranks wait in a collective: stop the whole job
            raise
        row = {"bench": "train_step", "algo": algo, "preset": args.preset, "world_size": 1}
        row.update(prompt_len=prompt_len, response_len=response_len, micro_batch=args.micro_batch)
        row["error"] = f"OutOfMemoryError: {str(e).splitlines()[0][:200]}"
        print(
            f"[train_step] {algo} {args.preset} P={prompt_len} R={response_len}: {row['error']}", flush=True
        )
    finally:
        del s
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    info = init_distributed()
    device = torch.device("cpu") if args.device == "cpu" else info.device
    rank0 = info.rank == 0
    env = env_info()
    peak = None  # no datasheet number for CPUs
    if device.type == "cuda":
        dp = flops.device_peak(torch.cuda.get_device_name(device))
        peak = dp.bf16_tflops if dp else None
    n = 8192 if device.type == "cuda" else 256  # 8192^3 bf16: near cuBLAS's best on H100; ~1.5 ms
    measured = flops.measured_matmul_peak_tflops(device, dtype=_DTYPES[args.param_dtype], n=n)
    rows = []
    try:
        for prompt_len in args.prompt_len:
            for response_len in args.response_len:
                for algo in args.algo:
                    row = _run_config(args, device, info, algo, prompt_len, response_len, peak, measured)
                    rows.append({**env, **row})
    finally:
        destroy()
    if rank0:
        write_jsonl(args.out_dir, "train_step", rows)
        path = write_markdown(args.out_dir, "train_step", "Train step throughput per GPU", rows, COLUMNS)
        print(f"\n{markdown_table(rows, COLUMNS)}\n[train_step] wrote {path}", flush=True)


if __name__ == "__main__":
    main()
