"""Which settings may change on resume (`RESUME_FREE_KEYS`), i.e. stay out of `TrainConfig.hash()`.

checkpoint.every / keep_last / export_final / resume / overwrite (when and what to save, not what
is trained: lowering keep_last after a full disk is fine), eval.* (evaluation reads the weights and
never feeds back into training, nor draws from the training RNGs), run.plots, run.num_threads
(CPU threads: the same math, though a CPU run's last bits may differ), run.log_every,
run.stop_after_step (debug stop), run.max_nonfinite_steps (when to give up, not what is trained),
run.out_dir and run.name (where the run lives, so a moved run
directory resumes). Every other setting, including new ones by default, changes the trajectory:
model.*, data.* (the states, tokenizer, prompt format, shuffle), optim.*, fsdp.*, every stage's
section, rollout.*, run.seed and run.stages. Paths in model/data stay in: another path may be
other data, and telling cheaply that two paths hold the same bytes is not possible.
Used by `TrainConfig.hash()` and by the resume check of trainer/run_dir.py.
"""

from __future__ import annotations

RESUME_FREE_KEYS = (
    "checkpoint.every",
    "checkpoint.keep_last",
    "checkpoint.export_final",
    "checkpoint.resume",
    "checkpoint.overwrite",
    "eval.*",
    "run.plots",
    "run.num_threads",
    "run.log_every",
    "run.stop_after_step",
    "run.max_nonfinite_steps",
    "run.out_dir",
    "run.name",
)
"""Settings that may differ between a run and its resume (see the module docstring for why);
'section.*' covers a whole section."""


def flatten(d: dict) -> dict:
    """{"section": {"key": v}} -> {"section.key": v}; keys that are already flat pass through."""
    out = {}
    for section, values in d.items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def _resume_free(key: str) -> bool:
    section = key.partition(".")[0]
    return key in RESUME_FREE_KEYS or f"{section}.*" in RESUME_FREE_KEYS


def trajectory_settings(config: dict) -> dict:
    """The settings of a `TrainConfig.to_dict()` (nested or flat) that change the training
    trajectory, as a flat {"section.key": value} dict: everything but RESUME_FREE_KEYS."""
    return {k: v for k, v in flatten(config).items() if not _resume_free(k)}
