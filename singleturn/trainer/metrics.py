"""Run metrics: metrics.jsonl (one row per step or eval), a progress line with ETA, plots.

Only rank 0 writes. Rows carry `kind` ("sft", "grpo", "eval") and the global `step`. On resume
the rows logged after the restored checkpoint are dropped first, so a resumed run's file reads as
if the run had never stopped. TensorBoard scalars are written too when `tensorboard` is installed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from singleturn.trainer.stages import STAGES


class MetricsLogger:
    """Appends rows to <run_dir>/metrics.jsonl and prints a progress line (rank 0 only)."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int | None = None, log_every: int = 1):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.log_every = log_every
        self._tb = None
        self._stage_t0: float | None = None
        self._stage_step0 = 0
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            rows = read_metrics(self.path)
            keep = [r for r in rows if resume_step is not None and r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        try:  # optional dependency
            from torch.utils.tensorboard import SummaryWriter  # lazy: optional, and slow to import

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except Exception:
            self._tb = None

    def log(self, row: dict) -> None:
        """Append one row (JSON-serializable scalars) to metrics.jsonl."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            kind = row.get("kind", "train")
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{kind}/{k}", v, row.get("step", 0))

    def start_stage(self, first_step: int) -> None:
        """Reset the ETA clock (stages run at different speeds)."""
        self._stage_t0 = time.perf_counter()
        self._stage_step0 = first_step

    def progress(self, stage: str, step: int, last_step: int, row: dict, keys: tuple[str, ...]) -> None:
        """`[sft] step 12/100 (12%) loss 1.234 ... | 3.1 s/it, ETA 4m32s` every log_every steps."""
        if not self.enabled or (step % self.log_every and step != last_step):
            return
        done = step - self._stage_step0 + 1
        elapsed = time.perf_counter() - (self._stage_t0 or time.perf_counter())
        per = elapsed / max(done, 1)
        eta = per * (last_step - step)
        first = self._stage_step0 - 1
        pct = 100.0 * (step - first) / max(last_step - first, 1)
        vals = " ".join(f"{k} {_fmt(row[k])}" for k in keys if k in row)
        print(
            f"[{stage}] step {step}/{last_step} ({pct:.0f}%) {vals} | {per:.2f} s/it, ETA {_hms(eta)}",
            flush=True,
            file=sys.stdout,
        )

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl (a torn last line from a kill is ignored)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_plots(run_dir: Path) -> list[Path]:
    """plots/{loss,reward,accuracy,success}.png from metrics.jsonl (matplotlib, Agg backend); the
    series of each plot come from the stage registry (`Stage.plot_keys`). A plot with no point is
    not written; a run that logged nothing (every stage at 0 steps, evaluation off) gets none."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    import matplotlib  # lazy: optional plotting dependency, slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    rows = read_metrics(run_dir / "metrics.jsonl")
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)

    ylabels = {"loss": "loss", "reward": "mean reward", "accuracy": "accuracy"}
    series = {
        name: [(s.name, s.plot_keys[name]) for s in STAGES.values() if name in s.plot_keys]
        for name in ylabels
    }
    series["accuracy"].append(("eval", "action_accuracy"))
    series["accuracy"].append(("holdout", "agreement"))  # teacher-forced, held-out training games
    specs = [(name, series[name], ylabels[name]) for name in ylabels]
    specs.append(("success", [("eval", "success_rate")], "multi-turn success rate"))
    written = []
    for name, series, ylabel in specs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for kind, key in series:
            pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and _finite(r.get(key))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(
                    xs, ys, marker="o" if kind in ("eval", "holdout") else None, ms=3, label=f"{kind}: {key}"
                )
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Clock:
    """Wall seconds per named phase (rank 0 reports them at the end)."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.t[name] = round(self.t.get(name, 0.0) + seconds, 2)
