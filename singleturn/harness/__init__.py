"""ALFWorld harness: game generation/discovery, env workers, expert states, prompts, evaluation.

Never imports torch; the trainer meets it at states.jsonl and at a batched policy callable.

The names below are exported lazily (PEP 562): prompts and states files need neither ALFWorld nor
TextWorld, so `from singleturn.harness import render_prompt, parse_action, read_states` works on a
machine without them (a bare GPU image training from a states file); game generation, env workers,
expert play and evaluation import alfworld when first used.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "EvalReport": "evaluate",
    "evaluate": "evaluate",
    "TASK_TYPES": "tasks",
    "GenConfig": "games",
    "find_games": "games",
    "generate_games": "games",
    "generation_dir": "games",
    "GenerationError": "games",
    "versions": "games",
    "parse_action": "prompts",
    "render_prompt": "prompts",
    "PromptFormat": "prompts",
    "collect_states": "states",
    "read_states": "states",
    "EnvPool": "workers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'singleturn.harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"singleturn.harness.{module}"), name)
    globals()[name] = value  # once: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """This package's module type: importing the submodule `singleturn.harness.evaluate` (done by
    `__getattr__`, the trainer, the CLI) makes the import system set the package attribute
    `evaluate` to that submodule, hiding the exported `evaluate` function for every later
    `from singleturn.harness import evaluate`. An exported name is never rebound to a module."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return  # `from singleturn.harness.evaluate import ...` still works (sys.modules)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
