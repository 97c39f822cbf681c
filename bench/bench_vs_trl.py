"""Single-turn GRPO through TRL's GRPOTrainer and through ours: the same job side by side, one run.

The job (both sides): an HF-format LLaMA checkpoint (`--model`: the tiny default's export, or
SmolLM2-135M), the same expert states in the same order (step s trains the states our trainer's
`batch_indices(s)` picks; TRL gets them as a dataset in that order with `shuffle_dataset=False`),
the same prompts (our chat-template ids; the script checks that TRL tokenized every prompt to the
same ids), the same reward (1{parse_action(response) == expert action}, trainer/reward.py), G
samples per state, `--states` states per optimizer step, max new tokens, temperature 1, top-p 1,
the same end-of-turn stop ids, AdamW with the same betas/eps/weight decay at a constant lr, grad
clip 1.0, one epoch per batch (TRL: `num_iterations=1`, `beta=0`, `loss_type="dapo"`,
`scale_rewards="group"`, one generation per optimizer step, no gradient checkpointing: its default
is on, ours has none), fp32, `--threads` torch threads.

Each side runs in its own subprocess (its own peak RSS, no shared caches), one after the other:
  trl                  TRL's GRPOTrainer (its own generation and loss);
  ours                 the `grpo` stage's step as the trainer runs it (prefix-shared update,
                       zero-variance groups dropped, KV cache of each prompt shared by its G rows);
  ours-keep            ours, training the zero-variance groups too (advantage 0), as TRL does;
  ours-padded-keep     ours-keep with the padded update (grpo.shared_prefix=false): TRL's work.
Reported: median seconds per step (burn-in steps excluded), completions/s, the rollout's share,
peak RSS, mean reward, and ratios against TRL; the ladder trl -> ours-padded-keep -> ours-keep ->
ours splits the speed-up into rollout + framework, prefix sharing and dropping zero-variance groups.

    python bench/bench_vs_trl.py --model runs/tiny-cpu/final --states data/games/states-train-n300-s0.jsonl
    python bench/bench_vs_trl.py --model data/models/SmolLM2-135M-Instruct --states ... --states-per-step 8

TRL is not a project dependency: `pip install -e .[trl]` (trl 1.16, datasets); without it the
script says so and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, base_parser, env_info, markdown_table, write_jsonl, write_markdown

SIDES = ("trl", "ours", "ours-keep", "ours-padded-keep")


def parse_args(argv=None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--model", help="HF checkpoint dir (config.json, safetensors, tokenizer)")
    p.add_argument("--states", help="states.jsonl (harness expert states)")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per side (incl. burn-in)")
    p.add_argument("--burn-in", type=int, default=1, help="first steps excluded from the median")
    p.add_argument("--states-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--history-window", type=int, default=2)
    p.add_argument("--system-prompt", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=16, help="TRL sequences per forward/backward")
    p.add_argument("--max-tokens", type=int, default=4096, help="ours: tokens per micro-batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="label of this run in the results (e.g. the model)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.cpu_smoke and not (args.model and args.states):
        p.error("--model and --states are required (or --cpu-smoke: a synthetic tiny job)")
    return args


_ROOMS = ["cabinet 1", "countertop 1", "sinkbasin 1", "toilet 1"]


def synthetic_job(root: Path) -> tuple[Path, Path]:
    """(checkpoint dir, states.jsonl): a random 1-layer LLaMA, its BPE tokenizer, 8 one-step states."""
    import dataclasses

    from singleturn.harness import render_prompt
    from singleturn.model import PRESETS, Transformer, save_hf_checkpoint, train_tokenizer

    states = []
    for i, room in enumerate(_ROOMS * 2):
        states.append(
            {
                "game": f"g{i}",
                "task_type": "pick_and_place_simple",
                "step": 0,
                "goal": f"put a cloth in {room.split()[0]}",
                "history": [],
                "observation": "You are in the middle of a room. You see " + ", ".join(_ROOMS) + ".",
                "admissible": [f"go to {r}" for r in _ROOMS] + ["look", "inventory"],
                "expert_action": f"go to {room}",
            }
        )
    (root / "states.jsonl").write_text("".join(json.dumps(s) + "\n" for s in states))
    texts = [m["content"] for s in states for m in render_prompt(s, 2, False)] + [
        s["expert_action"] for s in states
    ]
    tok = train_tokenizer(texts, 300)
    cfg = dataclasses.replace(
        PRESETS["tiny"],
        vocab_size=tok.vocab_size,
        dim=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        ffn_dim=64,
        max_seq_len=512,
    )
    save_hf_checkpoint(Transformer(cfg), root / "ckpt")
    tok.save_pretrained(root / "ckpt")
    return root / "ckpt", root / "states.jsonl"


def job(args):
    """(tokenizer, per-step example lists): the states each step trains, in our trainer's order."""
    from singleturn.harness import read_states
    from singleturn.model.tokenizer import Tokenizer
    from singleturn.trainer.data import batch_indices, build_examples

    tok = Tokenizer.from_file(args.model)
    examples, _ = build_examples(
        read_states(args.states),
        tok,
        history_window=args.history_window,
        max_seq_len=args.max_seq_len,
        system_prompt=args.system_prompt,
    )
    steps = [
        [examples[j] for j in batch_indices(s, args.states_per_step, len(examples), args.seed)]
        for s in range(args.steps)
    ]
    return tok, examples, steps


def train_config(args, side: str):
    from singleturn.trainer.config import build_config

    return build_config(
        {
            "model": {"path": args.model},
            "data": {
                "history_window": args.history_window,
                "system_prompt": args.system_prompt,
                "max_seq_len": args.max_seq_len,
                "seed": args.seed,
            },
            "optim": {"lr": args.lr, "schedule": "constant", "warmup_steps": 0, "grad_clip": 1.0},
            "rollout": {
                "group_size": args.group_size,
                "temperature": 1.0,
                "max_new_tokens": args.max_new_tokens,
                "dtype": "float32",
            },
            "grpo": {
                "steps": args.steps,
                "batch_size": args.states_per_step,
                "oversample": 1,
                "lr": args.lr,
                "kl_coef": 0.0,
                "ppo_epochs": 1,
                "shared_prefix": side != "ours-padded-keep",
                "train_zero_variance": side != "ours",  # equal work: TRL trains them (advantage 0)
                "max_tokens_per_micro_batch": args.max_tokens,
                "micro_batch_size": args.micro_batch,
            },
            "run": {"seed": args.seed},
        }
    )


def run_ours(args, side: str) -> dict:
    import torch

    import singleturn.trainer.stages.grpo as grpo_stage
    from singleturn.model import load_hf_checkpoint
    from singleturn.trainer.dist import init_distributed
    from singleturn.trainer.fsdp import apply_fsdp
    from singleturn.trainer.optim import make_optimizer
    from singleturn.trainer.stages import StageContext, StageSpan

    tok, examples, _ = job(args)
    cfg = train_config(args, side)
    info = init_distributed()
    model, _ = load_hf_checkpoint(args.model, device=info.device, dtype=torch.float32)
    fsdp = apply_fsdp(model, param_dtype=torch.float32, reduce_dtype=torch.float32)
    ctx = StageContext(
        model=model,
        fsdp=fsdp,
        tokenizer=tok,
        examples=examples,
        cfg=cfg,
        info=info,
        optimizer=make_optimizer(fsdp, cfg.optim, args.lr),
    )
    stage = grpo_stage.GRPOStage(ctx, StageSpan("grpo", 1, args.steps))
    steps = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        row = stage.step(ctx, i)
        steps.append(
            {
                "seconds": time.perf_counter() - t0,
                "rollout_s": row["time_rollout"],
                "reward": row["reward_mean"],
                "trained": row["kept_sequences"],
                "zero_var_groups": row["zero_var_groups"],
                "loss": row["loss"],
            }
        )
    return {"steps": steps}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from singleturn.model.policy import stop_ids
    from singleturn.trainer.config import OptimConfig
    from singleturn.trainer.reward import expert_match_rewards

    tok, _, steps = job(args)
    rows = [e for step in steps for e in step]
    data = Dataset.from_list(
        [{"prompt": tok.render_chat(_messages(e, args)), "state": json.dumps(e.state)} for e in rows]
    )
    hf_tok = AutoTokenizer.from_pretrained(args.model)
    if hf_tok.pad_token is None:
        hf_tok.pad_token_id = tok.pad_id
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.generation_config.eos_token_id = list(stop_ids(tok))
    gen = {"seconds": 0.0, "mismatched_prompts": 0, "prompts": 0}
    generate = model.generate

    def timed_generate(*a, **kw):  # TRL's only generation call on this path (no vLLM)
        for ids, mask in zip(kw["input_ids"].tolist(), kw["attention_mask"].tolist()):  # left-padded
            gen["prompts"] += 1
            gen["mismatched_prompts"] += tuple(i for i, m in zip(ids, mask) if m) not in expected
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        gen["seconds"] += time.perf_counter() - t0
        return out

    model.generate = timed_generate
    expected = {tuple(e.prompt_ids) for e in rows}

    def reward(prompts, completions, completion_ids, state, **_):
        states = [json.loads(s) for s in state]  # TRL repeats each state G times, in order
        return expert_match_rewards(completions, states, 1).rewards.tolist()

    per_step = args.states_per_step * args.group_size
    if per_step % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide states x G = {per_step}")
    o = OptimConfig()
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        data_seed=args.seed,
        max_steps=args.steps,
        logging_steps=1,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=per_step // args.micro_batch,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_epsilon=o.eps,
        weight_decay=o.weight_decay,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        disable_dropout=True,
        gradient_checkpointing=False,  # TRL's GRPOConfig defaults to True; ours recomputes nothing
    )
    # TRL's dataset repeat: each prompt appears G times in a row; a step's states are ours, in order.
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=hf_tok
    )
    steps_out: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0, self.g0 = time.perf_counter(), gen["seconds"]

        def on_step_end(self, *a, **kw):
            steps_out.append(
                {"seconds": time.perf_counter() - self.t0, "rollout_s": gen["seconds"] - self.g0}
            )

        def on_log(self, _args, _state, _control, logs=None, **kw):
            if logs and "reward" in logs and steps_out:
                steps_out[-1].update(reward=logs["reward"], loss=logs.get("loss"))

    trainer.add_callback(Timer())
    trainer.train()
    if gen["mismatched_prompts"]:
        raise SystemExit(f"TRL tokenized {gen['mismatched_prompts']}/{gen['prompts']} prompts differently")
    for s in steps_out:
        s["trained"] = per_step
    return {"steps": steps_out, "prompts_checked": gen["prompts"]}


def _messages(example, args):
    from singleturn.trainer.data import prompt_messages

    return prompt_messages(example.state, args.history_window, args.system_prompt)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = run_trl(args) if args.side == "trl" else run_ours(args, args.side)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.result.write_text(json.dumps(out))


def summarize(side: str, res: dict, args) -> dict:
    timed = res["steps"][args.burn_in :] or res["steps"]
    sec = statistics.median(s["seconds"] for s in timed)
    per_step = args.states_per_step * args.group_size
    return {
        "tag": args.tag,
        "side": side,
        "s_per_step": sec,
        "completions_per_s": per_step / sec,
        "rollout_frac": statistics.median(s["rollout_s"] / s["seconds"] for s in timed),
        "trained_per_step": statistics.mean(s["trained"] for s in timed),
        "reward": statistics.mean(s["reward"] for s in res["steps"] if s.get("reward") is not None),
        "peak_rss_mb": res["peak_rss_mb"],
        "steps": len(res["steps"]),
        "burn_in": args.burn_in,
        "states_per_step": args.states_per_step,
        "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "model": args.model,
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.side:
        child(args)
        return 0
    has_trl = importlib.util.find_spec("trl") is not None
    if args.cpu_smoke and not args.model:  # `make bench`: a synthetic job, TRL's side when installed
        model, states = synthetic_job(Path(tempfile.mkdtemp(prefix="bench-vs-trl-")))
        sides = [s for s in args.sides if s != "trl" or has_trl]
        argv += [
            "--model",
            str(model),
            "--states",
            str(states),
            "--steps",
            "2",
            "--states-per-step",
            "4",
            "--group-size",
            "4",
            "--max-new-tokens",
            "4",
            "--micro-batch",
            "8",
            "--threads",
            "1",
            "--tag",
            args.tag or "cpu-smoke",
            "--sides",
            *sides,
        ]
        args = parse_args(argv)
    if "trl" in args.sides and not has_trl:
        print("bench_vs_trl: TRL is not installed (pip install -e '.[trl]')", file=sys.stderr)
        return 2
    rows = []
    for side in args.sides:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, *argv]
            cmd += ["--side", side, "--result", str(result)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=f"{REPO}:{REPO / 'bench'}")
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env)
            row = summarize(side, json.loads(result.read_text()), args)
            row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["side"] == "trl"), None)
    for r in rows:
        r["speedup_vs_trl"] = base["s_per_step"] / r["s_per_step"] if base else None
    env = env_info()
    rows = [{**env, **r} for r in rows]
    write_jsonl(args.out_dir, "vs_trl", rows)
    columns = [
        ("tag", "model"),
        ("side", "side"),
        ("s_per_step", "s/step (median)"),
        ("completions_per_s", "completions/s"),
        ("speedup_vs_trl", "x TRL"),
        ("rollout_frac", "rollout share"),
        ("trained_per_step", "sequences trained/step"),
        ("reward", "mean reward"),
        ("peak_rss_mb", "peak RSS MiB"),
    ]
    path = write_markdown(
        args.out_dir, f"vs_trl_{args.tag or 'run'}", "GRPO step: TRL vs ours", rows, columns
    )
    print(markdown_table(rows, columns))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
