"""The `lm` stage: a language-model warm-up for from-scratch models.

Next-token cross-entropy over the whole rendered prompt + expert action of the train states (every
token after the first). It stands in for the pretraining a real LLaMA already has: a model trained
from scratch must first learn the domain text and to copy names from its prompt. The model is not a
policy yet, so the stage is never evaluated.
"""

from __future__ import annotations

from singleturn.trainer.data import Example
from singleturn.trainer.stages.base import StageContext, register
from singleturn.trainer.stages.sft import SFTStage


@register
class LMStage(SFTStage):
    name = section = "lm"
    label = "LM warm-up"
    method = "LM warm-up"
    kind = "warmup"
    log_keys = ("loss", "grad_norm", "tokens_per_s")
    plot_keys = {"loss": "loss"}
    trains_episodes = False  # per-state text, whatever the prompt format

    def examples(self, ctx: StageContext, i: int) -> list[Example]:
        # The first token is the context; every later prompt token and the action are targets.
        return [
            Example(e.prompt_ids[:1], e.prompt_ids[1:] + e.target_ids, e.state)
            for e in super().examples(ctx, i)
        ]

    def postprocess(self, stats: dict) -> None:
        stats.pop("action_prob")  # the probability of a whole prompt says nothing

    @classmethod
    def finish(cls, ctx: StageContext) -> None:
        pass  # the warm-up model is nobody's reference
