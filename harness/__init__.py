"""ALFWorld harness: game generation/discovery, env workers, expert states, prompts, evaluation.

Never imports torch; the trainer meets it at states.jsonl and at a batched policy callable.
"""

from harness.evaluate import EvalReport, evaluate
from harness.games import TASK_TYPES, GenConfig, find_games, generate_games, versions
from harness.prompts import parse_action, render_prompt
from harness.states import collect_states, read_states
from harness.workers import EnvPool

__all__ = [
    "TASK_TYPES",
    "EnvPool",
    "EvalReport",
    "GenConfig",
    "collect_states",
    "evaluate",
    "find_games",
    "generate_games",
    "parse_action",
    "read_states",
    "render_prompt",
    "versions",
]
