"""The run's checkpoint policy: when to save (`should_save`), what a checkpoint carries beyond the
weights and AdamW (`extra`: step, stage, config hash, RNG states, counters, the stage's own state),
and the resume that restores it all (trainer/checkpoint.py does the files)."""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from singleturn.trainer.checkpoint import load_latest_checkpoint, save_checkpoint
from singleturn.trainer.config import ConfigError, TrainConfig
from singleturn.trainer.dist import is_main
from singleturn.trainer.metrics import Clock
from singleturn.trainer.run_dir import RunDirError
from singleturn.trainer.stages import Stage, StageContext, StageSpan


def _log0(msg: str) -> None:
    if is_main():
        print(msg, flush=True)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Checkpointer:
    """Decides when to save and writes/reads the sharded checkpoints of the run directory."""

    def __init__(self, cfg: TrainConfig, clock: Clock):
        self.cfg, self.clock = cfg, clock
        self.run_dir = cfg.run_dir

    def should_save(self, step: int, span: StageSpan) -> bool:
        every = self.cfg.checkpoint.every
        return step == span.last or bool(every and step % every == 0) or self.cfg.run.stop_after_step == step

    def save(self, step: int, stage: Stage, ctx: StageContext, clock: dict | None = None) -> None:
        """clock: the run's timings so far (seconds per phase, "total"): a resume continues them."""
        t = time.perf_counter()
        extra = {
            "clock": dict(clock or {}),
            "step": step,
            "stage": stage.name,
            "config_hash": self.cfg.hash(),
            "rng": rng_state(),
            "data_position": step,
            "skipped_steps": ctx.skipped_steps,
            "nonfinite_steps": ctx.nonfinite_steps,
            "stage_state": stage.state_dict(),  # e.g. the ppo critic (replicated, every rank)
        }
        save_checkpoint(
            self.run_dir,
            step,
            fsdp=ctx.fsdp,
            optimizer=ctx.optimizer,
            extra=extra,
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.clock.add("checkpoint", time.perf_counter() - t)

    def resume(self, ctx: StageContext) -> dict:
        """Load the newest complete checkpoint into ctx (weights, optimizer, RNG, counters); returns
        its `extra` ({} when there is none: the run starts from step 0)."""
        extra = load_latest_checkpoint(self.run_dir, fsdp=ctx.fsdp, optimizer=ctx.optimizer)
        if extra is None:
            if orphans := _outputs_of_trained_weights(self.run_dir):
                raise RunDirError(
                    f"--resume: {self.run_dir} has no checkpoint, but holds outputs of trained weights "
                    f"({', '.join(orphans)}); starting over would mix them with a new run's. Restore "
                    "checkpoints/, or pass --overwrite (instead of --resume) to delete them and start over"
                )
            _log0("[resume] no complete checkpoint found: starting from scratch")
            return {}
        if extra["config_hash"] != self.cfg.hash():
            raise ConfigError(
                f"--resume: the checkpoint at step {extra['step']} was written with a different config "
                f"(hash {extra['config_hash']} vs {self.cfg.hash()}); use a new run.name"
            )
        ctx.skipped_steps = int(extra.get("skipped_steps", 0))
        ctx.nonfinite_steps = int(extra.get("nonfinite_steps", 0))
        set_rng_state(extra["rng"])
        _log0(f"[resume] continuing after step {extra['step']}")
        return extra


_STEP0_LABELS = ("random", "zero-shot")  # evaluated before any update: valid for a restart from 0


def _outputs_of_trained_weights(run_dir) -> list[str]:
    """What in `run_dir` came from weights past step 0 (final/, sft_model/, eval/<label>.json and
    .episodes.jsonl of a trained label), relative names: a resume that finds no checkpoint must not
    restart next to them (the table would describe other weights than final/)."""
    found = [name for name in ("final", "sft_model") if (run_dir / name).exists()]
    for path in sorted((run_dir / "eval").glob("*.json*")):
        label = path.name.removesuffix(".json").removesuffix(".episodes.jsonl")
        if label not in _STEP0_LABELS and path.name in (f"{label}.json", f"{label}.episodes.jsonl"):
            found.append(f"eval/{path.name}")
    return found
