"""The stage protocol (`Stage`, `StageContext`, `StageSpan`) and the registry `STAGES` that each
stage file fills with `@register` (trainer/stages/__init__.py imports them all; see its docstring)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from singleturn.trainer.data import batch_indices, rank_slice
from singleturn.trainer.dist import barrier, is_main
from singleturn.trainer.optim import NonFiniteError, lr_at, optimizer_step
from singleturn.trainer.policy_loss import Layout

STAGES: dict[str, type[Stage]] = {}
"""name -> Stage class, in registration order (the order of the table and the plots)."""


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: add a stage to `STAGES` (names are unique)."""
    if cls.name in STAGES:
        raise ValueError(f"stage {cls.name!r} registered twice")
    STAGES[cls.name] = cls
    return cls


@dataclass
class StageContext:
    """What every stage's step needs: built once by the Trainer, shared by all stages."""

    model: torch.nn.Module
    fsdp: object
    tokenizer: object
    examples: list
    """Single-turn problems (trainer.data.Example) from the expert states."""
    cfg: object
    """The whole TrainConfig (stages read their own section and the shared ones)."""
    info: object
    """trainer.dist.DistInfo."""
    episodes: list = field(default_factory=list)
    """data.prompt='episode': the expert episodes as token trees (trainer.episode_data.EpisodeExample),
    what SFT trains on; empty otherwise."""
    optimizer: torch.optim.Optimizer | None = None
    ref: torch.nn.Module | None = None
    """The frozen KL reference, when a stage needs one."""
    export: Callable[[Path], None] | None = None
    """Writes the current weights as an HF directory (collective: every rank calls it)."""
    reference_dir: Path | None = None
    """Where the SFT weights go when a later stage needs them as its frozen reference."""
    skipped_steps: int = 0
    """Steps whose update was skipped (non-finite, or nothing to learn from)."""
    nonfinite_steps: int = 0
    """Of those, updates skipped because a loss, the gradient norm or the update was non-finite."""
    nonfinite_streak: int = 0
    """Consecutive non-finite updates (optim.max_nonfinite_steps of them stop the run)."""
    last_skip: str = ""

    def export_once(self, directory: Path) -> None:
        """`export` unless the directory already holds a checkpoint (a resumed run)."""
        if not (Path(directory) / "config.json").exists():
            self.export(Path(directory))
        barrier()

    def autocast(self):
        """The training forwards' precision context (fsdp.autocast): bf16 autocast or a no-op."""
        if self.cfg.fsdp.autocast == "bfloat16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def layout(self, section):
        """The policy update's packing (trainer.policy_loss.Layout) from a grpo/ppo config section."""
        return Layout(
            shared_prefix=section.shared_prefix,
            micro_batch_size=section.micro_batch_size,
            max_tokens=section.max_tokens_per_micro_batch,
            row_len=self.cfg.data.max_seq_len,
            prefix_chains=self.cfg.data.prompt == "episode",  # prompts that extend one another share a trunk
        )

    @property
    def head(self):
        """The LM head weight [V, D], valid outside a module forward (the sticky FSDP head unit)."""
        return self.model.output.weight

    def apply_update(self, lr: float, nonfinite: int) -> tuple[float, bool]:
        """Clip + AdamW step through the NaN/inf guard (trainer/optim.py); counts skipped steps and
        stops the run (NonFiniteError) after optim.max_nonfinite_steps consecutive non-finite ones."""
        o = self.cfg.optim
        res = optimizer_step(
            self.fsdp,
            self.optimizer,
            lr=lr,
            grad_clip=o.grad_clip,
            nonfinite=nonfinite,
            guard=o.guard_updates,
        )
        self.last_skip = res.cause
        if res.applied:
            self.nonfinite_streak = 0
            return res.grad_norm, True
        self.skipped_steps += 1
        self.nonfinite_steps += 1
        self.nonfinite_streak += 1
        if is_main():
            print(f"[guard] update skipped: {res.cause} (grad norm {res.grad_norm:.4g})", flush=True)
        if self.nonfinite_streak >= self.cfg.run.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_streak} consecutive non-finite updates (last: {res.cause}); "
                f"run.max_nonfinite_steps={self.cfg.run.max_nonfinite_steps}. The weights and the last checkpoint "
                "hold no non-finite value: lower the lr (or fix the data) and --resume"
            )
        return res.grad_norm, False


@dataclass
class StageSpan:
    name: str
    first: int
    last: int

    @property
    def total(self) -> int:
        return self.last - self.first + 1


class Stage:
    """Base class of a training stage (see the module docstring)."""

    name: ClassVar[str]
    section: ClassVar[str]
    """Config section with its steps, batch sizes and lr."""
    label: ClassVar[str]
    """Row name of the run's table ("SFT+GRPO")."""
    method: ClassVar[str]
    """Row name of the comparison table ("GRPO (single-turn)")."""
    kind: ClassVar[str]
    """'warmup', 'supervised' or 'rl'."""
    log_keys: ClassVar[tuple[str, ...]]
    """Metrics shown on the progress line."""
    plot_keys: ClassVar[dict[str, str]] = {}
    """Plot name ('loss', 'reward', 'accuracy') -> the metric plotted for this stage."""

    def __init__(self, ctx: StageContext, span: StageSpan):
        self.span = span

    @classmethod
    def steps(cls, cfg) -> int:
        return getattr(cfg, cls.section).steps

    @classmethod
    def peak_lr(cls, cfg) -> float:
        return getattr(cfg, cls.section).lr or cfg.optim.lr

    @classmethod
    def global_batch(cls, cfg) -> tuple[str, int]:
        """(what, how many) is split over ranks each step: must divide by the world size."""
        section = getattr(cfg, cls.section)
        return f"{cls.section}.batch_size", section.batch_size

    @classmethod
    def needs_reference(cls, cfg) -> bool:
        """Whether the stage needs the frozen SFT reference (exported when SFT ends)."""
        return False

    @classmethod
    def samples(cls, cfg, rows: list[dict]) -> int:
        """Sampled responses the stage drew, from its metrics rows (the comparison's budget)."""
        return 0

    @classmethod
    def samples_per_step(cls, cfg) -> int:
        """The most responses one step can sample (sizes an RL stage to a sample budget)."""
        raise NotImplementedError(f"stage {cls.name!r} samples nothing")

    def lr(self, ctx: StageContext, i: int) -> float:
        return lr_at(ctx.cfg.optim, self.peak_lr(ctx.cfg), i, self.span.total)

    def step(self, ctx: StageContext, i: int) -> dict:
        raise NotImplementedError

    @classmethod
    def finish(cls, ctx: StageContext) -> None:
        """Runs after the stage's last step, also on a resumed run that finished it earlier (so it
        must be idempotent: e.g. write a file unless it exists)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def stage_spans(cfg) -> list[StageSpan]:
    """Global step ranges of the configured stages, in order."""
    spans, step = [], 0
    for name in cfg.run.stages:
        n = STAGES[name].steps(cfg)
        spans.append(StageSpan(name, step + 1, step + n))
        step += n
    return spans


def rl_stage_names() -> tuple[str, ...]:
    return tuple(n for n, s in STAGES.items() if s.kind == "rl")


def local_examples(ctx: StageContext, i: int, batch_size: int, items: list | None = None) -> list:
    """This rank's share of global batch i of `items` (default ctx.examples; a pure function of the
    step: resume needs no state). The expert states of the episode format are drawn episode by
    episode (whole episodes in a shuffled order, each in step order), so a batch's prompts extend one
    another and the policy update computes each episode's shared trunk once (Layout.prefix_chains)."""
    blocks = None
    if items is None:
        items = ctx.examples
        if ctx.episodes:
            blocks = tuple(len(e.states) for e in ctx.episodes)
    idx = batch_indices(i, batch_size, len(items), ctx.cfg.data.seed, blocks)
    return [items[j] for j in rank_slice(idx, ctx.info.rank, ctx.info.world_size)]
