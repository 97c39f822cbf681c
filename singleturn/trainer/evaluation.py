"""Multi-turn evaluation on held-out games and the run's results table.

`Evaluator(label, step)` evaluates the run's current policy (or, for label "random", the
uniform-random policy over admissible actions, the table's floor) with `harness.evaluate` on
rank 0 and writes eval/<label>.json and eval/<label>.md; every rank must call it (the model's full
weights are gathered collectively with `fsdp.summon_full_params`; rank 0 plays, the others wait).
A label already evaluated (its json exists: a resumed run) is not evaluated again; one killed
part-way resumes from eval/<label>.episodes.jsonl (its finished episodes), unless it was played
with other settings (eval.* may change on resume: the games, step limit, decoding), which restart it. eval/<label>.md, then
eval/<label>.json are written atomically (the json last: it marks the label done); a json that
does not parse all the same (damaged on disk) is an error naming the file and what to delete. The policy is
`model.EpisodePolicy` built from the run's `PolicySpec` (decoding, constraints, dtype, prompt
settings), the same spec `final/policy.json` carries for `python -m singleturn.harness evaluate`.
`comparison_table` renders the table the run prints.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from singleturn import harness
from singleturn.harness.atomic import write_text_atomic
from singleturn.harness.tasks import TASK_SHORT
from singleturn.model.policy import DTYPES, PolicySpec
from singleturn.trainer.dist import barrier, broadcast_object, is_main
from singleturn.trainer.run_dir import RunDirError
from singleturn.trainer.table import num, pct


def policy_spec(cfg):
    """The `model.policy.PolicySpec` the run evaluates with (and exports next to its weights)."""
    return PolicySpec(
        decoding=cfg.eval.decoding,
        constrained=cfg.eval.constrained,
        max_new_tokens=cfg.eval.max_new_tokens,
        dtype=cfg.rollout.dtype,
        history_window=cfg.data.history_window,
        system_prompt=cfg.data.system_prompt,
        max_steps=cfg.eval.max_steps,
        prompt=cfg.data.prompt,
        list_admissible=cfg.data.list_admissible,
        batch_size=cfg.eval.batch_size or 8 * cfg.eval.num_workers,
        max_len=cfg.data.max_seq_len if cfg.data.prompt == "episode" else 0,
    )


class Evaluator:
    """Evaluates a label once (all ranks call), logs the `[eval]` line and the metrics row."""

    def __init__(self, cfg, *, games: list[str], model, fsdp, tokenizer, metrics, clock):
        self.cfg, self.games, self.spec = cfg, games, policy_spec(cfg)
        self.model, self.fsdp, self.tokenizer = model, fsdp, tokenizer
        self.metrics, self.clock = metrics, clock
        self.run_dir = cfg.run_dir

    def __call__(self, label: str, step: int) -> None:
        if not self.cfg.eval.enabled or not self.games or load_eval(self.run_dir, label) is not None:
            return
        t0 = time.perf_counter()
        rep = self._random(label) if label == "random" else self._model(label)
        dt = time.perf_counter() - t0
        self.clock.add(f"eval/{label}", dt)
        row = {"kind": "eval", "step": step, "label": label, "time_eval": dt}
        keys = (
            "success_rate",
            "action_accuracy",
            "mean_steps_success",
            "invalid_action_rate",
            "env_failures",
        )
        row.update({k: rep.get(k) for k in keys})
        for task, v in (rep.get("per_task") or {}).items():
            row[f"success/{task}"] = v["success_rate"] if isinstance(v, dict) else v
        self.metrics.log(row)
        if is_main():
            print(
                f"[eval] {label} @ step {step}: success {row['success_rate']:.3f} "
                f"action acc {row['action_accuracy']:.3f} env failures {row['env_failures']} ({dt:.0f}s)",
                flush=True,
            )

    def _play(self, policy, label: str, seed: int = 0):
        log = self.run_dir / "eval" / f"{label}.episodes.jsonl"  # a killed evaluation resumes from it
        log.parent.mkdir(parents=True, exist_ok=True)
        return harness.evaluate(
            policy,
            self.games,
            max_steps=self.spec.max_steps,
            num_workers=self.cfg.eval.num_workers,
            history_window=self.spec.history_window,
            system_prompt=self.spec.system_prompt,
            prompt=self.spec.prompt,
            list_admissible=self.spec.list_admissible,
            batch_size=self.spec.batch_size,
            seed=seed,
            episodes_log=log,
            log_settings={"spec": dataclasses.asdict(self.spec)},  # eval.* may change on resume
        )

    def _model(self, label: str) -> dict:
        t0 = time.perf_counter()
        report = None
        with self.fsdp.summon_full_params(dtype=DTYPES[self.spec.dtype]):
            if is_main():
                policy = self.spec.policy(self.model, self.tokenizer)
                try:
                    report = _save(self._play(policy, label), label, self.run_dir, time.perf_counter() - t0)
                finally:
                    policy.close()  # its KV caches
            barrier()
        return broadcast_object(report)

    def _random(self, label: str) -> dict:
        t0 = time.perf_counter()
        report = None
        if is_main():
            rep = self._play("random", label, seed=self.cfg.run.seed)
            report = _save(rep, label, self.run_dir, time.perf_counter() - t0)
        barrier()
        return broadcast_object(report)


def _save(rep, label: str, run_dir: Path, seconds: float) -> dict:
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    d = rep.to_dict()
    d["label"] = label
    d["eval_seconds"] = round(seconds, 2)
    write_text_atomic(out / f"{label}.md", rep.to_markdown())
    write_text_atomic(out / f"{label}.json", json.dumps(d, indent=2))  # last: marks the label done
    return d


def load_eval(run_dir: Path, label: str) -> dict | None:
    """A previously written eval/<label>.json (resume), or None when there is none. RunDirError
    naming the file when it exists but is not a JSON object (damaged: delete it to re-evaluate)."""
    path = Path(run_dir) / "eval" / f"{label}.json"
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict):
            raise ValueError(f"not a JSON object ({type(report).__name__})")
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise RunDirError(
            f"{path} is unreadable ({type(e).__name__}: {e}); delete it to evaluate {label!r} again"
        ) from None
    return report


def _task_rates(report: dict) -> dict[str, float]:
    out = {}
    for task, v in (report.get("per_task") or {}).items():
        out[task] = v["success_rate"] if isinstance(v, dict) else float(v)
    return out


def comparison_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table: one row per (policy name, report dict)."""
    tasks = sorted(
        {t for _, r in rows for t in _task_rates(r)},
        key=lambda t: list(TASK_SHORT).index(t) if t in TASK_SHORT else 99,
    )
    head = (
        ["policy", "success"]
        + [TASK_SHORT.get(t, t) for t in tasks]
        + ["action acc", "steps (expert)", "invalid", "env failures"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        rates = _task_rates(r)
        steps = r.get("mean_steps_success")
        expert = r.get("expert_mean_steps")
        cells = [name, pct(r.get("success_rate"))]
        cells += [pct(rates.get(t)) for t in tasks]
        cells += [
            pct(r.get("action_accuracy")),
            f"{num(steps)} ({num(expert)})",
            pct(r.get("invalid_action_rate")),
            str(r.get("env_failures", "-")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0][1].get("episodes") if rows else None
    if isinstance(n, list):
        n = len(n)
    lines.append("")
    lines.append(
        f"{n} held-out episodes per policy; success per task type; steps = mean steps on successes; "
        "env failures = episodes lost to an env crash or hang (counted as not won)."
    )
    return "\n".join(lines)
