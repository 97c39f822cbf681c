"""A whole run: prepare data, build the model, train the stages, evaluate, checkpoint, export.

`train(cfg, info)` is what `trainer/main.py` calls after parsing the config and initializing the
process group. The order of a default run:
  data (games, states, tokenizer) -> model -> [random-policy eval] -> SFT -> eval "sft"
  -> GRPO (eval every eval.every steps) -> eval "grpo" -> final/ export -> table + plots.
Every post-stage action writes a file and is skipped when the file exists on a resumed run, so a
run killed anywhere resumes without redoing finished work (and without changing the trajectory).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from trainer.config import ConfigError, TrainConfig, format_config
from trainer.data import build_examples, read_states
from trainer.dist import barrier, is_main
from trainer.evaluation import comparison_table, load_eval, run_eval, run_random_eval
from trainer.loop import StepRunner, make_optimizer, peak_memory_mb, rng_state, set_rng_state, stage_spans
from trainer.metrics import MetricsLogger, write_plots
from trainer.pipeline import build_model, load_tokenizer, num_params, prepare_data
from trainer.ppo import MULTITURN_STAGES, MultiTurnStage  # the multi-turn baselines

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_LABELS = {
    "random": "random",
    "sft": "SFT",
    "grpo": "SFT+GRPO",
    "ppo": "SFT+PPO",
    "grpo-multiturn": "SFT+GRPO-MT",
}
_SFT_KEYS = ("loss", "action_prob", "grad_norm", "tokens_per_s")
_GRPO_KEYS = ("loss", "reward_mean", "pass_at_g", "zero_var_groups", "clip_frac", "kl", "response_len")


def _log0(msg: str) -> None:
    if is_main():
        print(msg, flush=True)


class _Clock:
    """Wall seconds per named phase (rank 0 reports them at the end)."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.t[name] = round(self.t.get(name, 0.0) + seconds, 2)


def train(cfg: TrainConfig, info) -> None:
    """Run every configured stage end to end (all ranks call this)."""
    from trainer.checkpoint import export_final, load_latest_checkpoint
    from trainer.fsdp import apply_fsdp

    t_start = time.perf_counter()
    clock = _Clock()
    run_dir = cfg.run_dir
    if is_main():
        print(format_config(cfg), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if not cfg.checkpoint.resume and (run_dir / "checkpoints").exists():
            print(f"[run] fresh run: removing old checkpoints in {run_dir / 'checkpoints'}", flush=True)
            shutil.rmtree(run_dir / "checkpoints")
            shutil.rmtree(run_dir / "eval", ignore_errors=True)
    barrier()

    # --- data ---
    t0 = time.perf_counter()
    art = prepare_data(
        cfg.data,
        model_path=cfg.model.path,
        need_eval_games=cfg.eval.enabled,
        eval_max_steps=cfg.eval.max_steps,
    )
    for k, v in art.timings.items():
        clock.add(f"data/{k}", v)
    tokenizer = load_tokenizer(art.tokenizer_path)
    examples, dropped = build_examples(
        read_states(art.states_path),
        tokenizer,
        history_window=cfg.data.history_window,
        system_prompt=cfg.data.system_prompt,
        max_seq_len=min(cfg.data.max_seq_len, cfg.model.max_seq_len if not cfg.model.path else 1 << 30),
    )
    if not examples:
        raise ConfigError(f"no state fits in data.max_seq_len={cfg.data.max_seq_len} ({dropped} dropped)")
    plen = sorted(len(e.prompt_ids) for e in examples)
    _log0(
        f"[data] {len(examples)} states ({dropped} dropped for length), prompt tokens median "
        f"{plen[len(plen) // 2]} max {plen[-1]}, vocab {tokenizer.vocab_size} ({art.tokenizer_path})"
    )
    clock.add("data/total", time.perf_counter() - t0)

    # --- model ---
    model, model_cfg = build_model(cfg.model, tokenizer=tokenizer, device=info.device)
    n_params = num_params(model)
    fsdp = apply_fsdp(
        model,
        param_dtype=_DTYPES[cfg.fsdp.param_dtype],
        reduce_dtype=_DTYPES[cfg.fsdp.reduce_dtype],
        activation_checkpointing=cfg.fsdp.activation_checkpointing,
    )
    runner = StepRunner(model=model, fsdp=fsdp, tokenizer=tokenizer, examples=examples, cfg=cfg, info=info)
    runner.optimizer = make_optimizer(fsdp, cfg.optim, cfg.optim.lr)
    _log0(f"[model] {n_params / 1e6:.2f}M parameters, {model_cfg.n_layers} layers, dim {model_cfg.dim}")

    # --- resume ---
    start = 0
    resumed: dict = {}
    if cfg.checkpoint.resume:
        extra = load_latest_checkpoint(run_dir, fsdp=fsdp, optimizer=runner.optimizer)
        if extra is not None:
            if extra["config_hash"] != cfg.hash():
                raise ConfigError(
                    f"--resume: the checkpoint at step {extra['step']} was written with a different config "
                    f"(hash {extra['config_hash']} vs {cfg.hash()}); use a new run.name"
                )
            start = int(extra["step"])
            resumed = extra
            runner.skipped_steps = int(extra.get("skipped_steps", 0))
            set_rng_state(extra["rng"])
            _log0(f"[resume] continuing after step {start}")
        else:
            _log0("[resume] no complete checkpoint found: starting from scratch")
    metrics = MetricsLogger(run_dir, enabled=is_main(), resume_step=start, log_every=cfg.run.log_every)
    mem = fsdp.memory_report(runner.optimizer)
    _log0(f"[fsdp] memory per rank: {_fmt_mem(mem)}")

    games = [g for split in cfg.data.eval_splits for g in art.eval_games.get(split, [])]

    def evaluate(label: str, step: int) -> None:
        if not cfg.eval.enabled or not games or load_eval(run_dir, label) is not None:
            return
        t = time.perf_counter()
        if label == "random":
            rep = run_random_eval(
                games=games,
                eval_cfg=cfg.eval,
                history_window=cfg.data.history_window,
                system_prompt=cfg.data.system_prompt,
                run_dir=run_dir,
                seed=cfg.run.seed,
            )
        else:
            rep = run_eval(
                label,
                model=model,
                fsdp=fsdp,
                tokenizer=tokenizer,
                games=games,
                eval_cfg=cfg.eval,
                history_window=cfg.data.history_window,
                system_prompt=cfg.data.system_prompt,
                run_dir=run_dir,
                max_seq_len=model_cfg.max_seq_len,
                dtype=cfg.rollout.dtype,
            )
        dt = time.perf_counter() - t
        clock.add(f"eval/{label}", dt)
        row = {"kind": "eval", "step": step, "label": label, "time_eval": dt}
        row.update(
            {
                k: rep.get(k)
                for k in ("success_rate", "action_accuracy", "mean_steps_success", "invalid_action_rate")
            }
        )
        for task, v in (rep.get("per_task") or {}).items():
            row[f"success/{task}"] = v["success_rate"] if isinstance(v, dict) else v
        metrics.log(row)
        _log0(
            f"[eval] {label} @ step {step}: success {row['success_rate']:.3f} action acc {row['action_accuracy']:.3f} ({dt:.0f}s)"
        )

    if cfg.eval.random_baseline:
        evaluate("random", 0)

    def save(step: int, stage: str) -> None:
        from trainer.checkpoint import save_checkpoint

        t = time.perf_counter()
        extra = {
            "step": step,
            "stage": stage,
            "config_hash": cfg.hash(),
            "rng": rng_state(),
            "data_position": step,
            "skipped_steps": runner.skipped_steps,
        }
        if multiturn is not None:
            extra["multiturn"] = multiturn.state_dict()  # the ppo critic (replicated, every rank)
        save_checkpoint(
            run_dir,
            step,
            fsdp=fsdp,
            optimizer=runner.optimizer,
            extra=extra,
            keep_last=cfg.checkpoint.keep_last,
        )
        clock.add("checkpoint", time.perf_counter() - t)

    for span in stage_spans(cfg):
        if span.last > start:
            if start < span.first:
                stage_lr = {"lm": cfg.lm.lr, "sft": cfg.sft.lr, "grpo": cfg.grpo.lr}.get(
                    span.name, cfg.ppo.lr
                )
                lr = stage_lr or cfg.optim.lr
                runner.optimizer = make_optimizer(fsdp, cfg.optim, lr)  # each stage starts a fresh AdamW
            if span.name == "grpo" and cfg.grpo.kl_coef > 0:
                runner.ref = _build_reference(cfg, run_dir, tokenizer, info, apply_fsdp)
            total = span.last - span.first + 1
            multiturn = None
            if span.name in MULTITURN_STAGES:
                multiturn = MultiTurnStage(
                    runner,
                    span.name,
                    ppo_cfg=cfg.ppo,
                    rollout_cfg=cfg.rollout,
                    data_cfg=cfg.data,
                    run_seed=cfg.run.seed,
                )
                if span.first <= start < span.last and resumed.get("stage") == span.name:
                    multiturn.load_state_dict(resumed.get("multiturn", {}))  # resumed mid-stage
            metrics.start_stage(max(span.first, start + 1))
            t_stage = time.perf_counter()
            for step in range(max(span.first, start + 1), span.last + 1):
                i = step - span.first
                if span.name in ("lm", "sft"):
                    row = runner.sft_step(i, total, lm=span.name == "lm")
                elif multiturn is not None:
                    row = multiturn.step(step, i, total)
                else:
                    row = runner.grpo_step(step, i, total)
                row.update(kind=span.name, step=step, stage_step=i + 1, skipped_total=runner.skipped_steps)
                row["peak_mem_mb"] = peak_memory_mb(info.device)
                metrics.log(row)
                metrics.progress(
                    span.name, step, span.last, row, _SFT_KEYS if span.name in ("lm", "sft") else _GRPO_KEYS
                )
                every = cfg.checkpoint.every
                stop = cfg.run.stop_after_step == step
                if step == span.last or (every and step % every == 0) or stop:
                    save(step, span.name)
                if stop:
                    _log0(f"[run] run.stop_after_step={step}: stopping after the checkpoint (debug)")
                    metrics.close()
                    return
                if (
                    span.name in ("grpo", *MULTITURN_STAGES)
                    and cfg.eval.every
                    and step % cfg.eval.every == 0
                    and step != span.last
                ):
                    clock.add(f"train/{span.name}", time.perf_counter() - t_stage)
                    evaluate(f"step_{step}", step)
                    t_stage = time.perf_counter()
            clock.add(f"train/{span.name}", time.perf_counter() - t_stage)
        if span.name == "sft" and cfg.grpo.kl_coef > 0 and "grpo" in cfg.run.stages:
            _export_reference(run_dir, fsdp, model_cfg, art.tokenizer_path, export_final)
        if span.name != "lm":  # the warm-up model is not a policy yet
            evaluate(span.name, span.last)

    if cfg.checkpoint.export_final:
        t = time.perf_counter()
        export_final(run_dir / "final", fsdp, model_cfg, art.tokenizer_path)
        barrier()
        clock.add("export_final", time.perf_counter() - t)
    clock.add("total", time.perf_counter() - t_start)
    if is_main():
        _finish(cfg, run_dir, clock, runner.skipped_steps)
    metrics.close()


def _fmt_mem(mem: dict) -> str:
    parts = []
    for k, v in mem.items():
        parts.append(f"{k}={v / 2**20:.1f}MiB" if isinstance(v, (int, float)) and v > 4096 else f"{k}={v}")
    return ", ".join(parts)


def _export_reference(run_dir: Path, fsdp, model_cfg, tokenizer_path: str, export_final) -> None:
    if not (run_dir / "sft_model" / "config.json").exists():
        export_final(run_dir / "sft_model", fsdp, model_cfg, tokenizer_path)
    barrier()


def _build_reference(cfg, run_dir: Path, tokenizer, info, apply_fsdp):
    """The frozen KL reference: the SFT weights (or the initial weights without an SFT stage), sharded."""
    from model import load_hf_checkpoint

    if "sft" in cfg.run.stages:
        ref, _ = load_hf_checkpoint(run_dir / "sft_model", device=info.device, dtype=torch.float32)
    else:
        ref, _ = build_model(cfg.model, tokenizer=tokenizer, device=info.device)
    ref.requires_grad_(False)
    apply_fsdp(ref, param_dtype=_DTYPES[cfg.fsdp.param_dtype], reduce_dtype=_DTYPES[cfg.fsdp.reduce_dtype])
    return ref


def _finish(cfg, run_dir: Path, clock: _Clock, skipped: int) -> None:
    rows = []
    for label in ("random", *(s for s in cfg.run.stages if s != "lm")):
        rep = load_eval(run_dir, label)
        if rep is not None:
            rows.append((_LABELS[label], rep))
    if rows:
        table = comparison_table(rows)
        (run_dir / "eval" / "summary.md").write_text(table + "\n")
        print("\n" + table + "\n", flush=True)
    if cfg.run.plots:
        write_plots(run_dir)
    (run_dir / "timings.json").write_text(json.dumps(clock.t, indent=2))
    print("[timings] " + ", ".join(f"{k} {v:.1f}s" for k, v in clock.t.items()), flush=True)
    print(f"[run] done: {run_dir} (skipped non-finite/empty steps: {skipped})", flush=True)
