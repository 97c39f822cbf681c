"""Load and play one ALFWorld game the way ALFWorld's `AlfredTWEnv` does, plus three fixes.

TextWorld's `PddlEnv` wrapped by ALFWorld's own `AlfredDemangler(shuffle=False)`, `AlfredInfos` and
`AlfredExpert`, as `AlfredTWEnv.init_env` registers them. Fixes (idempotent, ../shared/ALFWORLD.md):
`AlfredExpert` gets `expert_type=` by keyword; `install_expert_patch()` translates the grammar's
`move X to Y` for the handcoded expert's state tracking; `install_caches()` memoizes TextWorld's
grammar parses and the PDDL->SAS translation (in memory and pickled on disk, see `cache_dir`) with
observations and admissible commands byte-identical. Details: docs/pieces.md (harness/).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import pickle
import random
import re
import sys
import types
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import fast_downward
import textworld
import textworld.envs.pddl.logic as pddl_logic
import textworld.envs.pddl.pddl as pddl_env
import textworld.envs.pddl.textgen as textgen
import textworld.logic as tw_logic
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
from alfworld.agents.expert import handcoded_expert

EXPERTS = ("handcoded", "planner")
# Sent to the env in place of an unparseable policy output: the engine answers "Nothing happens."
# (as for any unknown command) and the handcoded expert's keyword-based tracking ignores it.
INVALID_COMMAND = "nothing"


# --------------------------------------------------------------------------- expert patch
_ORIG_UPDATE_STATE_TRACKING = handcoded_expert.BasePolicy.update_state_tracking


def _translate_move(last_action: str) -> str:
    """'move mug 1 to cabinet 2' -> 'put mug 1 in/on cabinet 2' (the form the expert tracks)."""
    if last_action.startswith("move ") and " to " in last_action:
        obj, recep = last_action[len("move ") :].split(" to ", 1)
        return f"put {obj} in/on {recep}"
    return last_action


@functools.wraps(_ORIG_UPDATE_STATE_TRACKING)
def _patched_update_state_tracking(self, game_state, last_action):
    return _ORIG_UPDATE_STATE_TRACKING(self, game_state, _translate_move(last_action))


def install_expert_patch(enabled: bool = True) -> None:
    """Install (or with enabled=False, remove) the 'move X to Y' fix for the handcoded expert."""
    fn = _patched_update_state_tracking if enabled else _ORIG_UPDATE_STATE_TRACKING
    handcoded_expert.BasePolicy.update_state_tracking = fn


def expert_patch_installed() -> bool:
    return handcoded_expert.BasePolicy.update_state_tracking is _patched_update_state_tracking


# --------------------------------------------------------------------------- caches
_CACHES_INSTALLED = False
_DISK_BACKED: list = []  # the in-memory layers over the disk cache (clear_memory_caches empties them)
_TASK_RHS = re.compile(r'"rhs": "Your task is to: ([^"]*)"')
_PLAIN_GOAL = re.compile(r"[A-Za-z0-9 ,.'-]+")  # no grammar syntax (#, {}, []) nor escapes


def cache_dir() -> Path | None:
    """Where parsed game logic and translations are pickled: $HARNESS_CACHE_DIR, else
    $ALFWORLD_DATA/harness_cache; None (memory only) when neither is set or HARNESS_CACHE_DIR=''."""
    if "HARNESS_CACHE_DIR" in os.environ:
        return Path(os.environ["HARNESS_CACHE_DIR"]) if os.environ["HARNESS_CACHE_DIR"] else None
    if os.environ.get("ALFWORLD_DATA"):
        return Path(os.environ["ALFWORLD_DATA"]) / "harness_cache"
    return None


def _disk_cached(kind: str, key: tuple, compute):
    folder = cache_dir()
    if folder is None:
        return compute()
    h = hashlib.sha1(repr((kind, version("textworld"), version("fast-downward-textworld"), key)).encode())
    path = folder / kind / f"{h.hexdigest()}.pkl"
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        pass
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)  # atomic: concurrent workers never read a partial file
    return value


def _memo_over_disk(maxsize: int):
    """functools.lru_cache, registered so clear_memory_caches() can empty it."""

    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _DISK_BACKED.append(cached)
        return cached

    return wrap


def clear_memory_caches() -> None:
    """Forget the in-memory game logic / SAS translations: the next load reads (or writes) the disk
    cache, whatever this process loaded before."""
    for cached in _DISK_BACKED:
        cached.cache_clear()


def install_caches() -> None:
    """Memoize TatSu template parses and the PDDL translation (process-wide, idempotent)."""
    global _CACHES_INSTALLED
    if _CACHES_INSTALLED:
        return
    parse_and_convert = _cache_template_parses()
    _cache_game_logic(parse_and_convert)
    _cache_translation()
    _CACHES_INSTALLED = True


def _cache_template_parses():
    """Grammar templates, derivation contexts and conjunctive queries; returns the cached template
    parser (the game-logic cache parses each game's goal sentence with it)."""
    # Grammar templates: the parse result is a list of Symbol objects that derivation mutates
    # (ListSymbol.derive assigns contexts), so each call gets a deep copy of the cached parse.
    parse = textgen._parse_and_convert

    @functools.lru_cache(maxsize=4096)
    def _cached_symbols(text, rule_name):
        return parse(text, rule_name=rule_name)

    def _parse_and_convert(text, rule_name, **kwargs):
        if kwargs.get("trace"):
            return parse(text, rule_name=rule_name, **kwargs)
        return copy.deepcopy(_cached_symbols(text, rule_name))

    textgen._parse_and_convert = _parse_and_convert

    # Derivation contexts: TextWorld deep-copies the `variables` ({name: EntityInfo}) and
    # `mapping` ({Placeholder: Variable}) dicts for every symbol it expands; derivation only
    # rebinds keys and never mutates the values, so copying the dicts themselves is equivalent.
    def _copy_context(context):
        return {
            "state": context["state"],
            "facts": context["facts"],
            "variables": dict(context["variables"]),
            "mapping": dict(context["mapping"]),
            "entity_infos": context["entity_infos"],
        }

    textgen.copy_context = _copy_context

    # Conjunctive queries (grammar conditions): the Rule is only read, never mutated.
    query = tw_logic.Rule.parse_conjunctive_query.__func__
    cached_query = functools.lru_cache(maxsize=4096)(lambda cls, expr: query(cls, expr))
    tw_logic.Rule.parse_conjunctive_query = classmethod(cached_query)
    return _parse_and_convert


def _cache_game_logic(parse_and_convert) -> None:
    """Game logic (TatSu parse of the whole grammar): depends only on its input texts and is
    read-only afterwards, so it is memoized in memory and pickled on disk (a fresh worker process
    loads a known game in milliseconds)."""

    @_memo_over_disk(maxsize=64)
    def _parsed_logic(domain, grammar):
        return _disk_cached(
            "logic", (domain, grammar), lambda: pddl_logic.GameLogic(domain=domain, grammar=grammar)
        )

    def _game_logic(domain, grammar):
        # Games differ in the grammar only by their goal sentence: parse the grammar once with a
        # placeholder goal, then give each game a copy whose "task" rule holds its own sentence
        # (parsed exactly as ContextSensitiveGrammar.parse would).
        m = _TASK_RHS.search(grammar)
        if m is None or not _PLAIN_GOAL.fullmatch(m.group(1)):
            return _parsed_logic(domain, grammar)
        base = _parsed_logic(domain, grammar[: m.start(1)] + "UNKNOWN GOAL." + grammar[m.end(1) :])
        logic = copy.copy(base)
        logic.grammar = textgen.ContextSensitiveGrammar()
        logic.grammar._rules.update(base.grammar._rules)
        rhs = "Your task is to: " + m.group(1)
        logic.grammar._rules["task"] = [
            textgen.ProductionRule("task", parse_and_convert(rhs, rule_name="symbols"))
        ]
        return logic

    # PddlEnv reaches both classes through its module alias `pddl_logic`; swap the alias (not the
    # classes, which must stay picklable by name).
    pddl_env.pddl_logic = types.SimpleNamespace(GameLogic=_game_logic, PddlState=pddl_logic.PddlState)


def _cache_translation() -> None:
    """PDDL -> SAS translation (fast-downward), memoized in memory and on disk like the game logic;
    the translator overwrites sys.argv, which the wrapper restores."""
    pddl2sas = fast_downward.pddl2sas

    def _translate(domain, problem, verbose, optimize):
        argv = list(sys.argv)
        try:
            return pddl2sas(domain, problem, verbose=verbose, optimize=optimize)
        finally:
            sys.argv[:] = argv  # the translator overwrites sys.argv

    @_memo_over_disk(maxsize=256)
    def _cached_pddl2sas(domain, problem, verbose, optimize):
        key = (domain, problem, optimize)
        return _disk_cached("sas", key, lambda: _translate(domain, problem, verbose, optimize))

    def _pddl2sas(domain, problem, verbose=False, optimize=False):
        return _cached_pddl2sas(domain, problem, verbose, optimize)

    fast_downward.pddl2sas = _pddl2sas


# --------------------------------------------------------------------------- one env
@dataclass
class StepResult:
    """What one env returns after reset or step (picklable; crosses process boundaries)."""

    observation: str
    admissible: list[str]
    won: bool
    expert_action: str | None  # None: the expert had nothing to offer (timeout, no plan)
    goal: str = ""
    task_type: str = ""
    game: str = ""
    failed: bool = False  # the env crashed, hung or raised: the episode is an env failure
    error: str = ""
    extra: dict = field(default_factory=dict)


def game_goal(observation: str) -> str:
    """The task sentence of an intro text ('Your task is to: put a mug in cabinet.')."""
    marker = "Your task is to: "
    if marker not in observation:
        return ""
    return observation.split(marker, 1)[1].strip().rstrip(".").strip()


def read_task_type(game_path: str | Path) -> str:
    traj = Path(game_path).parent / "traj_data.json"
    if not traj.exists():
        return ""
    return json.loads(traj.read_text())["task_type"]


class AlfredGame:
    """One TextWorld env playing ALFWorld games, with the expert attached.

    `load(game)` + `reset()` then `step(command)`; a single instance can play many games in turn
    (each load reuses the same fast-downward library copy). Not thread-safe (TextWorld is not).
    """

    def __init__(self, expert: str = "handcoded", *, patch_expert: bool = True, caches: bool = True):
        if expert not in EXPERTS:
            raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
        if patch_expert:
            install_expert_patch()
        if caches:
            install_caches()
        self.expert = expert
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "expert_plan"])
        env = textworld.envs.pddl.PddlEnv(infos)
        # The wrappers AlfredTWEnv uses; the expert type by keyword (see module docstring).
        for wrapper in (
            AlfredDemangler(shuffle=False),
            AlfredInfos,
            AlfredExpert(expert_type=expert),
        ):
            env = wrapper(env)
        self._env = env
        self._rng = random.Random(0)
        self.game = ""
        self.task_type = ""
        self.goal = ""

    def load(self, game_path: str | Path) -> None:
        self.game = str(game_path)
        self._env.load(self.game)
        self.task_type = read_task_type(self.game)

    def reset(self, seed: int | None = None) -> StepResult:
        """Start an episode; `seed` seeds the handcoded expert's random choices."""
        self._rng = random.Random(seed)
        handcoded_expert.random = self._rng
        state = self._env.reset()
        self.goal = game_goal(state["feedback"])
        return self._result(state)

    def step(self, command: str) -> StepResult:
        # The handcoded expert calls the module-level `random`; point it at this episode's own
        # generator so episodes interleaved in one process stay reproducible.
        handcoded_expert.random = self._rng
        try:
            state, _, _ = self._env.step(command)
        except handcoded_expert.HandCodedAgentFailed:
            return self._result(self._env.state, expert_gave_up=True)
        except Exception as e:
            # ALFWorld's wrapper raises Exception("Timeout") past the expert's 200-step limit; the
            # env itself stepped fine, so the episode goes on with no expert label.
            if str(e) != "Timeout":
                raise
            return self._result(self._env.state, expert_gave_up=True)
        return self._result(state)

    def _result(self, state, expert_gave_up: bool = False) -> StepResult:
        plan = state.get("extra.expert_plan") or []
        expert_action = None if expert_gave_up or not plan else plan[0]
        return StepResult(
            observation=state["feedback"],
            admissible=list(state["admissible_commands"]),
            won=bool(state["won"]),
            expert_action=expert_action,
            goal=self.goal,
            task_type=self.task_type,
            game=self.game,
        )
