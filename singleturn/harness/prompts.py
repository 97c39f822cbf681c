"""The one prompt format (training and evaluation alike) and the action parser.

`render_prompt(state)` turns an expert state (a states.jsonl row, or the live state evaluation
builds) into chat messages: a system message with the rules and the action grammar, then one user
message with the goal, a short memory of the episode (`Visited:`, `Not visited:`, `Holding:`,
pure functions of the history that make the state nearly Markov), the last K turns, the current
observation and the admissible actions. `parse_action(text, admissible)` reads the action back (a
plain action or `... Action: <cmd>`), returning it only if admissible. Details: docs/pieces.md
(harness/).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


PROMPT_VERSION = 3
"""Bumped whenever the rendered text changes (caches keyed on prompts, e.g. tokenizers, include it)."""

_GO_TO = "go to "
_TAKE_RE = re.compile(r"^take (.+?) from ")
_MOVE_RE = re.compile(r"^move (.+?) to ")
_RECEPTACLE_RE = re.compile(r"\ban? ([a-z]+ \d+)")


def room_receptacles(first_observation: str) -> list[str]:
    """The receptacles the first observation lists ('... you see a cabinet 4, ..., and a toilet 1.')."""
    _, sep, listing = clean_observation(first_observation).partition("you see ")
    return _RECEPTACLE_RE.findall(listing) if sep else []


def episode_memory(history: list) -> tuple[list[str], str | None]:
    """(receptacles gone to, in order of first visit; the object held or None) after `history`."""
    visited: list[str] = []
    holding = None
    for _, action in history:
        action = " ".join(action.split())
        if action.startswith(_GO_TO):
            target = action[len(_GO_TO) :]
            if target not in visited:
                visited.append(target)
        elif m := _TAKE_RE.match(action):
            holding = m.group(1)
        elif _MOVE_RE.match(action):
            holding = None
    return visited, holding


def render_prompt(state: dict, history_window: int = 3, system_prompt: bool = True) -> list[dict]:
    """Chat messages for one state.

    state: {"goal": str, "history": [[observation, action], ...], "observation": str,
            "admissible": [str, ...]} (extra keys ignored). `history` holds every earlier turn from
    the episode's first observation on; the last `history_window` turns are shown (0: none), the
    rest enters only through the memory lines. Returns [{"role": "system", ...}, {"role": "user", ...}];
    with system_prompt=False only the user message (the rules cost ~125 tokens per prompt and carry
    nothing a model trained from scratch on this format can use).
    """
    lines = [f"Your task is to: {state['goal']}."]
    history = state.get("history") or []
    shown = history[-history_window:] if history_window > 0 else []
    if history:
        room = room_receptacles(history[0][0])
        if not room and len(shown) < len(history):  # an intro without a list has scrolled out
            lines.append(f"Room: {clean_observation(history[0][0])}")
        visited, holding = episode_memory(history)
        lines.append("Visited: " + (", ".join(visited) if visited else "nothing yet"))
        if room:
            rest = [r for r in room if r not in visited]
            lines.append("Not visited: " + (", ".join(rest) if rest else "nothing left"))
        lines.append(f"Holding: {holding or 'nothing'}")
    if shown:
        lines.append("")
        lines.append("Recent turns:")
        for observation, action in shown:
            lines.append(f"Observation: {clean_observation(observation)}")
            lines.append(f"Action: {action}")
    lines.append("")
    lines.append(f"Observation: {clean_observation(state['observation'])}")
    lines.append("Admissible actions: " + ", ".join(state["admissible"]))
    user = {"role": "user", "content": "\n".join(lines)}
    return [{"role": "system", "content": SYSTEM_PROMPT}, user] if system_prompt else [user]


def render_episode(
    state: dict, *, list_admissible: bool = True, system_prompt: bool = False
) -> tuple[list[dict], str]:
    """The episode as an append-only conversation (for model.EpisodeCache; not yet what training uses).

    Returns (messages, turn_suffix): user `Your task is to: <goal>.` + the first observation, then per
    earlier turn assistant `<action>` and user `Observation: <observation>`, the last user message
    holding the current observation. Turn t's messages are turn t-1's plus two, so the token stream
    only grows. turn_suffix is this turn's material that must not stay in the history: the admissible
    list (`\nAdmissible actions: ...`, appended to the last user message for this turn only), or ""
    (list_admissible=False: ranked decoding scores the commands anyway).
    """
    history = state.get("history") or []
    observations = [o for o, _ in history] + [state["observation"]]
    first = f"Your task is to: {state['goal']}.\nObservation: {clean_observation(observations[0])}"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system_prompt else []
    messages.append({"role": "user", "content": first})
    for (_, action), observation in zip(history, observations[1:]):
        messages.append({"role": "assistant", "content": action})
        messages.append({"role": "user", "content": f"Observation: {clean_observation(observation)}"})
    suffix = ("\nAdmissible actions: " + ", ".join(state["admissible"])) if list_admissible else ""
    return messages, suffix


@dataclass(frozen=True)
class PromptFormat:
    """How a state becomes the chat messages a policy reads: the one switch between the formats.

    kind 'window': `render_prompt(state, history_window, system_prompt)`. kind 'episode': the
    append-only conversation of `render_episode`, this turn's suffix (the admissible list when
    list_admissible) appended to the last user message: the same ids as the committed + this-turn ids
    an `EpisodeCache` holds, so per-state re-encoding and the cache see one sequence.
    """

    kind: str = "window"
    history_window: int = 3
    system_prompt: bool = True
    list_admissible: bool = True

    def __post_init__(self):
        if self.kind not in ("window", "episode"):
            raise ValueError(f"prompt format must be 'window' or 'episode', got {self.kind!r}")

    def messages(self, state: dict) -> list[dict]:
        if self.kind == "window":
            return render_prompt(state, self.history_window, self.system_prompt)
        messages, suffix = render_episode(
            state, list_admissible=self.list_admissible, system_prompt=self.system_prompt
        )
        return [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + suffix}]


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


def policy_actions(policy, states: list[dict], fmt: PromptFormat) -> list:
    """Ask a batched text policy (list[messages] -> list[str]) to act in `states`: render each
    state's prompt (`fmt`), pass the admissible commands when the policy asks for them (`wants_admissible`:
    constrained or ranked decoding), parse each response into an admissible action (None: invalid).
    The one call path for evaluation and for labelling a policy's own states."""
    if hasattr(policy, "act_states"):  # a policy that keeps episodes (model.EpisodePolicy): raw states
        return [parse_action(t, s["admissible"]) for s, t in zip(states, policy.act_states(states))]
    messages = [fmt.messages(s) for s in states]
    if getattr(policy, "wants_admissible", False):
        texts = policy(messages, admissible=[s["admissible"] for s in states])
    else:
        texts = policy(messages)
    if len(texts) != len(states):
        raise ValueError(f"policy returned {len(texts)} responses for {len(states)} prompts")
    return [parse_action(t, s["admissible"]) for s, t in zip(states, texts)]
