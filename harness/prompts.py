"""The one prompt format (training and evaluation alike) and the action parser.

`render_prompt(state)` turns an expert state (a states.jsonl row, or the live state evaluation
builds) into chat messages: a system message with the rules and the action grammar, then one user
message with the goal, the last K turns, the current observation and the admissible actions.
`parse_action(text, admissible)` reads the action back from a response: a plain action, or
`... Action: <cmd>` after some reasoning; case and whitespace are normalized and the action is
returned (in its admissible spelling) only if it is admissible.
"""

from __future__ import annotations

import re

SYSTEM_PROMPT = (
    "You are an agent in a household text game (ALFWorld). Each turn, pick exactly one of the "
    "admissible actions to make progress on the task.\n"
    "Action forms: go to <receptacle>; open <receptacle>; close <receptacle>; "
    "take <object> from <receptacle>; move <object> to <receptacle>; examine <something>; "
    "use <object>; heat <object> with <receptacle>; cool <object> with <receptacle>; "
    "clean <object> with <receptacle>; slice <object> with <object>; inventory; look.\n"
    "Reply with the action only, or reason briefly and end with 'Action: <action>'."
)
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
_ACTION_RE = re.compile(r"action\s*:", re.IGNORECASE)


def clean_observation(observation: str) -> str:
    """Drop the welcome banner and the task sentence (the prompt states the goal once)."""
    text = observation.replace(_BANNER, "")
    text = text.split("Your task is to:", 1)[0]
    return " ".join(text.split())


def render_prompt(state: dict, history_window: int = 3) -> list[dict]:
    """Chat messages for one state.

    state: {"goal": str, "history": [[observation, action], ...], "observation": str,
            "admissible": [str, ...]} (extra keys ignored). The last `history_window` turns of
    history are shown (0: none). Returns [{"role": "system", ...}, {"role": "user", ...}].
    """
    lines = [f"Your task is to: {state['goal']}."]
    history = state.get("history") or []
    shown = history[-history_window:] if history_window > 0 else []
    if shown:
        lines.append("")
        lines.append("Recent turns:")
        for observation, action in shown:
            lines.append(f"Observation: {clean_observation(observation)}")
            lines.append(f"Action: {action}")
    lines.append("")
    lines.append(f"Observation: {clean_observation(state['observation'])}")
    lines.append("Admissible actions: " + ", ".join(state["admissible"]))
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "\n".join(lines)},
    ]


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def parse_action(text: str | None, admissible: list[str]) -> str | None:
    """The admissible action a response names, or None.

    Takes the text after the last 'Action:' (if any), its first non-empty line, strips quotes,
    backticks, a leading '>' and trailing punctuation, normalizes case and whitespace, and returns
    the matching admissible command as spelled in `admissible`.
    """
    if not text or not text.strip():
        return None
    by_norm = {_normalize(a): a for a in admissible}
    parts = _ACTION_RE.split(text)
    candidate = parts[-1] if len(parts) > 1 else text
    for line in candidate.splitlines():
        line = line.strip().strip("`'\"*").strip()
        line = line.lstrip(">").strip().rstrip(".!;,").strip().strip("`'\"*").strip()
        if line:
            return by_norm.get(_normalize(line))
    return None
