"""Multi-turn evaluation on held-out games and the final comparison table.

`run_eval` evaluates one policy (model or random) with `harness.evaluate` on rank 0 and writes
eval/<label>.json and eval/<label>.md; every rank must call it (the model's full weights are
gathered collectively with `fsdp.summon_full_params`; rank 0 runs the episodes, others wait).
`comparison_table` renders the table the default run prints: success rate per task type for the
random policy, SFT and SFT+GRPO, action accuracy, mean steps on successes vs the expert.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from trainer.dist import barrier, broadcast_object, is_main
from trainer.policy import model_policy

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _evaluate(
    policy, games: list[str], eval_cfg, history_window: int, seed: int = 0, system_prompt: bool = True
):
    from harness.evaluate import evaluate

    return evaluate(
        policy,
        games,
        max_steps=eval_cfg.max_steps,
        num_workers=eval_cfg.num_workers,
        history_window=history_window,
        system_prompt=system_prompt,
        seed=seed,
    )


def run_eval(
    label: str,
    *,
    model,
    fsdp,
    tokenizer,
    games: list[str],
    eval_cfg,
    history_window: int,
    run_dir: Path,
    max_seq_len: int,
    system_prompt: bool = True,
    dtype: str = "float32",
) -> dict:
    """Evaluate the current model greedily (all ranks call; rank 0 plays). Returns the report dict."""
    t0 = time.perf_counter()
    report = None
    with fsdp.summon_full_params(dtype=_DTYPES[dtype]):
        if is_main():
            policy = model_policy(
                model,
                tokenizer,
                max_new_tokens=eval_cfg.max_new_tokens,
                max_seq_len=max_seq_len,
                constrained=eval_cfg.constrained,
                decoding=eval_cfg.decoding,
            )
            rep = _evaluate(policy, games, eval_cfg, history_window, system_prompt=system_prompt)
            report = _save(rep, label, run_dir, time.perf_counter() - t0)
        barrier()
    return broadcast_object(report)


def run_random_eval(
    *, games: list[str], eval_cfg, history_window: int, run_dir: Path, seed: int, system_prompt: bool = True
) -> dict:
    """The uniform-random policy over admissible actions (the table's floor); rank 0 plays."""
    t0 = time.perf_counter()
    report = None
    if is_main():
        rep = _evaluate("random", games, eval_cfg, history_window, seed=seed, system_prompt=system_prompt)
        report = _save(rep, "random", run_dir, time.perf_counter() - t0)
    barrier()
    return broadcast_object(report)


def _save(rep, label: str, run_dir: Path, seconds: float) -> dict:
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    d = rep.to_dict()
    d["label"] = label
    d["eval_seconds"] = round(seconds, 2)
    (out / f"{label}.json").write_text(json.dumps(d, indent=2))
    (out / f"{label}.md").write_text(rep.to_markdown())
    return d


def load_eval(run_dir: Path, label: str) -> dict | None:
    """A previously written eval/<label>.json (resume), or None."""
    path = Path(run_dir) / "eval" / f"{label}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _task_rates(report: dict) -> dict[str, float]:
    out = {}
    for task, v in (report.get("per_task") or {}).items():
        out[task] = v["success_rate"] if isinstance(v, dict) else float(v)
    return out


_SHORT = {
    "pick_and_place_simple": "pick",
    "look_at_obj_in_light": "look",
    "pick_clean_then_place_in_recep": "clean",
    "pick_heat_then_place_in_recep": "heat",
    "pick_cool_then_place_in_recep": "cool",
    "pick_two_obj_and_place": "pick2",
}


def comparison_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table: one row per (policy name, report dict)."""
    tasks = sorted(
        {t for _, r in rows for t in _task_rates(r)},
        key=lambda t: list(_SHORT).index(t) if t in _SHORT else 99,
    )
    head = (
        ["policy", "success"]
        + [_SHORT.get(t, t) for t in tasks]
        + ["action acc", "steps (expert)", "invalid"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        rates = _task_rates(r)
        steps = r.get("mean_steps_success")
        expert = r.get("expert_mean_steps")
        cells = [name, _pct(r.get("success_rate"))]
        cells += [_pct(rates.get(t)) for t in tasks]
        cells += [
            _pct(r.get("action_accuracy")),
            f"{_num(steps)} ({_num(expert)})",
            _pct(r.get("invalid_action_rate")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0][1].get("episodes") if rows else None
    if isinstance(n, list):
        n = len(n)
    lines.append("")
    lines.append(f"{n} held-out episodes per policy; success per task type; steps = mean steps on successes.")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100.0 * float(v):.1f}%"


def _num(v) -> str:
    return "-" if v is None else f"{float(v):.1f}"
