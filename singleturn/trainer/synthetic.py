"""A toy states file and tokenizer for smoke runs without ALFWorld (tests, the device run).

`write_synthetic_inputs(root)` writes `states.jsonl` in the harness schema (a toy task whose expert
action is inferable from the prompt: a few SFT steps make it likely, so GRPO groups get mixed rewards)
and a byte-level BPE tokenizer trained on its rendered prompts. `torchrun trainer/main.py
--data.states_path=... --data.tokenizer_path=...` then trains on it with no game generation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from singleturn.harness import render_prompt
from singleturn.model import train_tokenizer

_OBJECTS = ["mug", "apple", "book", "pen", "cup", "knife"]
_PLACES = ["desk", "shelf", "table", "drawer", "fridge", "sinkbasin"]


def write_synthetic_inputs(
    root: Path, n: int = 32, seed: int = 0, *, episodic: bool = False
) -> tuple[Path, Path]:
    """A states.jsonl in the harness schema (a toy task whose expert action is inferable from the
    prompt) and a byte-level BPE tokenizer trained on its rendered prompts. episodic: the states form
    whole episodes of 3 steps (game i // 3, each history the episode's earlier turns), as
    data.prompt='episode' needs; otherwise every state is its own game."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        obj, place = rng.choice(_OBJECTS), rng.choice(_PLACES)
        k = rng.randint(1, 3)
        adm = [f"go to {p} {k}" for p in _PLACES] + [f"take {obj} {k} from {place} {k}", "inventory", "look"]
        # Short expert actions a few SFT steps make likely, so GRPO groups get mixed rewards.
        expert = "look" if i % 2 == 0 else "inventory"
        if episodic:
            game = f"synthetic/{i // 3}"
            history = [[r["observation"], r["expert_action"]] for r in rows if r["game"] == game]
            rows.append(
                {
                    "game": game,
                    "task_type": "pick_and_place_simple",
                    "step": len(history),
                    "goal": f"put a {_OBJECTS[(i // 3) % 6]} in {_PLACES[(i // 3) % 6]}",
                    "history": history,
                    "observation": f"You see a {obj} {k} on the {place} {k}.",
                    "admissible": adm,
                    "expert_action": expert,
                }
            )
            continue
        rows.append(
            {
                "game": f"synthetic/{i}",
                "task_type": "pick_and_place_simple",
                "step": i % 3,
                "goal": f"put a {obj} in {place}",
                "history": [["You are in a room.", "look"]] if i % 3 else [],
                "observation": f"You see a {obj} {k} on the {place} {k}.",
                "admissible": adm,
                "expert_action": expert,
            }
        )
    states = root / "states.jsonl"
    states.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [m["content"] for r in rows for m in render_prompt(r, history_window=1)] + [
        r["expert_action"] for r in rows
    ]
    tok = train_tokenizer(texts, 400)
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    return states, tok_path
