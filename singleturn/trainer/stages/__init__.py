"""Training stages: one protocol, one registry, one file per stage.

A run is a list of stages (`run.stages`) over one global step counter: stage k owns global steps
`first..last` (its section's `steps`). Every reader of stage names (config validation, `--algo`,
the progress line, plots, the final table, the comparison driver) reads `STAGES`, so adding a stage
is one new file here that subclasses `Stage` (trainer/stages/base.py) and is imported below.

A stage is built when the run enters it (a fresh AdamW with the stage's lr is made just before,
unless a checkpoint taken mid-stage is being resumed), then `step(ctx, i)` runs its i-th step
(0-based) and returns the metrics row. What a stage keeps across steps beyond the model and the
optimizer (the PPO critic) goes through `state_dict` / `load_state_dict` into the checkpoint.

Stage kinds: "warmup" (lm: not a policy yet, never evaluated), "supervised" (sft: evaluated at its
end; a pre-RL stage), "rl" (grpo, ppo, grpo-multiturn, grpo-dagger: `--algo` choices, evaluated every
`eval.every` steps and at the end; `samples(rows)` counts the sampled responses they drew).
"""

from singleturn.trainer.stages.base import (
    STAGES,
    Stage,
    StageContext,
    StageSpan,
    local_examples,
    register,
    rl_stage_names,
    stage_spans,
)

# The registry: one import per stage file, in table order (lm imports sft, which registers first).
# isort: off
from singleturn.trainer.stages import lm, sft, grpo, ppo, grpo_multiturn, grpo_dagger  # noqa: F401
# isort: on

__all__ = [
    "STAGES",
    "Stage",
    "StageContext",
    "StageSpan",
    "local_examples",
    "register",
    "rl_stage_names",
    "stage_spans",
]
