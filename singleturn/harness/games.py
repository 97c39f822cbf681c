"""Generate ALFWorld games offline, in ALFWorld's own domain, and find games on disk.

Each game (`game.tw-pddl` + `traj_data.json`, in the official data's directory layout) holds a PDDL
problem from `game_pddl.py` and is played by the (patched, seeded) handcoded expert at generation
time; one it does not win within `max_expert_steps` is redrawn with the next attempt's seed.
Deterministic for (split, seed, index). A generation is written beside `out_dir` and renamed to it
when complete; a directory holding another generation is refused, never replaced, and a re-run with
the same arguments reuses the games in its `manifest.json`. `generation_dir` keys directories by
the arguments. Files and layout: docs/pieces.md (harness/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import secrets
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import alfworld.gen.constants as C

from singleturn.harness import scenes
from singleturn.harness.game_pddl import build_problem, goal_text, pick_task
from singleturn.harness.progress import Progress
from singleturn.harness.tasks import TASK_TYPES

log = logging.getLogger(__name__)  # warnings print even when logging is not configured

SPLITS = ("train", "valid_seen", "valid_unseen")
GENERATOR_VERSION = 1
_DATA = Path(C.__file__).parents[1] / "data"


@dataclass(frozen=True)
class GenConfig:
    """Knobs of one generation run (all recorded in the manifest)."""

    max_distractors: int = 10  # objects besides the targets (the planner slows with many)
    max_expert_steps: int = 50  # the handcoded expert must win within this many steps
    max_attempts: int = 20  # per game index, before giving up loudly


class GenerationError(RuntimeError):
    """A generation that cannot be done or reused as asked (the expert wins no instance of a game,
    or `out_dir` holds something other than this generation); the message says what to change."""


# --------------------------------------------------------------------------- one game
def _game_rng(split: str, seed: int, index: int, attempt: int) -> random.Random:
    return random.Random(f"{split}/{seed}/{index}/{attempt}")  # str seeds hash with sha512: stable


def _write_game(
    out_dir: Path, split: str, seed: int, index: int, attempt: int, task_type: str, cfg: GenConfig
):
    rng = _game_rng(split, seed, index, attempt)
    task = pick_task(task_type, split, rng)
    scene = scenes.load_scene(task.floorplan)
    trial = f"trial_{split}_s{seed}_{index:05d}"
    folder = f"{task.task_type}-{task.obj}-None-{task.parent or task.toggle}-{task.floorplan}"
    game_dir = out_dir / folder / trial
    goal = goal_text(task, rng)
    problem = build_problem(task, scene, rng, cfg.max_distractors, name=f"plan_{trial}")
    grammar = (_DATA / "alfred.twl2").read_text().replace("UNKNOWN GOAL", goal)
    game = {
        "pddl_domain": (_DATA / "alfred.pddl").read_text(),
        "grammar": grammar,
        "pddl_problem": problem,
        "solvable": True,
    }
    traj = {
        "task_type": task.task_type,
        "task_id": trial,
        "pddl_params": {
            "object_target": task.obj,
            "parent_target": task.parent,
            "toggle_target": task.toggle,
            "mrecep_target": "",
            "object_sliced": False,
        },
        "scene": {"floor_plan": f"FloorPlan{task.floorplan}", "scene_num": task.floorplan},
        "turk_annotations": {"anns": [{"task_desc": goal}]},
        "harness": {
            "split": split,
            "seed": seed,
            "index": index,
            "attempt": attempt,
            "version": GENERATOR_VERSION,
        },
    }
    game_dir.mkdir(parents=True, exist_ok=True)
    (game_dir / "traj_data.json").write_text(json.dumps(traj, indent=1))
    (game_dir / "game.tw-pddl").write_text(json.dumps(game))
    return game_dir / "game.tw-pddl"


def expert_episode_seed(game_path: str | Path, seed: int = 0) -> int:
    """The seed for the handcoded expert's random choices in one game's episode."""
    key = f"{Path(game_path).parent.parent.name}/{Path(game_path).parent.name}/{seed}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def play_expert(game, game_path: str | Path, max_steps: int, seed: int = 0) -> list[str] | None:
    """Play the game's own expert from reset; the winning action list, or None."""
    res = game.reset(seed=expert_episode_seed(game_path, seed))
    actions = []
    for _ in range(max_steps):
        if res.expert_action is None:
            return None
        actions.append(res.expert_action)
        res = game.step(res.expert_action)
        if res.won:
            return actions
    return None


def _generate_one(args) -> tuple[str, int, dict]:
    out_dir, split, seed, index, task_type, cfg = args
    from singleturn.harness.env import AlfredGame  # TextWorld takes seconds: only generation plays games

    game = AlfredGame("handcoded")
    for attempt in range(cfg.max_attempts):
        path = _write_game(Path(out_dir), split, seed, index, attempt, task_type, cfg)
        game.load(path)
        walkthrough = play_expert(game, path, cfg.max_expert_steps)
        if walkthrough is not None:
            data = json.loads(path.read_text())
            data["walkthrough"] = walkthrough
            path.write_text(json.dumps(data))
            traj = json.loads((path.parent / "traj_data.json").read_text())
            traj["harness"]["expert_steps"] = {"handcoded": len(walkthrough)}
            (path.parent / "traj_data.json").write_text(json.dumps(traj, indent=1))
            return str(path.relative_to(out_dir)), attempt, {}
        shutil.rmtree(path.parent)
        if not any(path.parent.parent.iterdir()):
            path.parent.parent.rmdir()
    raise GenerationError(
        f"game {split}/{seed}/{index} ({task_type}): the handcoded expert won none of {cfg.max_attempts} "
        f"instances within max_expert_steps={cfg.max_expert_steps} (the trainer passes eval.max_steps "
        "for held-out games: raise it)"
    )


# --------------------------------------------------------------------------- public API
def _generation_args(split: str, num_games: int, seed: int, task_types, cfg: GenConfig) -> dict:
    return {
        "split": split,
        "num_games": num_games,
        "seed": seed,
        "task_types": list(task_types),
        "config": cfg.__dict__,
        "version": GENERATOR_VERSION,
    }


def generation_dir(
    root: str | Path, split: str, num_games: int, seed: int, task_types=None, config: GenConfig | None = None
) -> Path:
    """`root/<split>/n<num_games>-s<seed>-<hash of every generation argument>`: the directory a
    shared games root keeps this generation in, so generations with other arguments (another
    eval_games or max_expert_steps) live side by side instead of replacing each other."""
    args = _generation_args(split, num_games, seed, tuple(task_types or TASK_TYPES), config or GenConfig())
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    return Path(root) / split / f"n{num_games}-s{seed}-{digest}"


def _reuse(out_dir: Path, args: dict) -> list[Path] | None:
    """The games of a finished generation in `out_dir` made with `args`; None when `out_dir` is
    absent or empty; GenerationError when it holds anything else (never deleted: another run may
    be reading it)."""
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.exists():
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise GenerationError(
                f"{out_dir} holds files but no manifest.json (not a finished generation): "
                "generate into another directory, or delete it if no run uses it"
            )
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        games, old_args = manifest["games"], manifest["args"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GenerationError(
            f"{manifest_path} is unreadable ({e}): delete {out_dir} to regenerate"
        ) from None
    if old_args != args:
        diff = "; ".join(
            f"{k}: {json.dumps(old_args.get(k))} -> {json.dumps(args[k])}"
            for k in args
            if old_args.get(k) != args[k]
        )
        raise GenerationError(
            f"{out_dir} holds games generated with other arguments ({diff}): generate into another "
            "directory (the trainer keys its directories by these arguments), or delete it if no run uses it"
        )
    paths = [out_dir / p for p in games]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise GenerationError(
            f"{len(missing)} of the {len(paths)} games listed in {manifest_path} are missing "
            f"(first: {missing[0]}): delete {out_dir} to regenerate"
        )
    return paths


def generate_games(
    out_dir: str | Path,
    split: str,
    num_games: int,
    seed: int,
    task_types=None,
    *,
    num_workers: int = 1,
    config: GenConfig | None = None,
) -> list[Path]:
    """Write `num_games` expert-checked games for `split` under `out_dir`; return their paths.

    Task types are assigned round-robin (balanced). Deterministic in (split, seed, index);
    `out_dir/manifest.json` records the arguments, and a re-run with the same arguments returns the
    existing games without regenerating them. Unsolvable draws are counted in the manifest
    (`regenerated`). Atomic: the games and manifest are written to a temporary directory beside
    `out_dir` and renamed to it once complete; a failed generation leaves nothing. Raises
    GenerationError, deleting nothing, when `out_dir` holds another generation (see `generation_dir`)
    or the expert wins no instance of some game within `config.max_expert_steps`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    task_types = tuple(task_types or TASK_TYPES)
    bad = [t for t in task_types if t not in TASK_TYPES]
    if bad:
        raise ValueError(f"unknown task types {bad}; known: {TASK_TYPES}")
    cfg = config or GenConfig()
    out_dir = Path(out_dir)
    args = _generation_args(split, num_games, seed, task_types, cfg)
    if (paths := _reuse(out_dir, args)) is not None:
        return paths
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")  # ours alone
    tmp.mkdir()
    try:
        manifest = _generate_into(tmp, args, task_types, cfg, num_workers)
        try:
            os.rename(tmp, out_dir)  # the commit point; replaces only an absent or empty out_dir
        except OSError:
            # Another process finished the same generation first (or put something else there).
            if (paths := _reuse(out_dir, args)) is None:
                raise
            shutil.rmtree(tmp)
            return paths
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / p for p in manifest["games"]]


def _generate_into(out_dir: Path, args: dict, task_types: tuple, cfg: GenConfig, num_workers: int) -> dict:
    """Generate every game of `args` into `out_dir` (a fresh directory) and write its manifest."""
    split, seed = args["split"], args["seed"]
    jobs = [
        (str(out_dir), split, seed, i, task_types[i % len(task_types)], cfg) for i in range(args["num_games"])
    ]
    t0 = time.perf_counter()
    progress = Progress(f"[games] {split}: generated", len(jobs))
    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            results = []
            for r in pool.map(_generate_one, jobs):
                results.append(r)
                progress.update()
    else:
        results = []
        for j in jobs:
            results.append(_generate_one(j))
            progress.update()
    manifest = {
        "args": args,
        "games": [r[0] for r in results],
        "regenerated": sum(r[1] for r in results),
        "seconds": round(time.perf_counter() - t0, 2),
        "versions": versions(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def find_games(root: str | Path, split: str | None = None) -> list[Path]:
    """Sorted `game.tw-pddl` paths under `root` (or `root/<split>`) that ALFWorld would load.

    Accepts our generated directories and the official data (`$ALFWORLD_DATA/json_2.1.1`, with
    `split` in train/valid_seen/valid_unseen). Like `AlfredTWEnv.collect_game_files`: a game needs
    a `traj_data.json` next to it and `solvable: true`; movable/sliced trajectories are skipped.
    Unreadable game files are left out with a warning each; `scan_games` returns them instead.
    """
    games, unreadable = scan_games(root, split)
    for path, why in unreadable:
        log.warning(f"skipping unreadable game {path} ({why})")
    return games


def scan_games(root: str | Path, split: str | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(games, unreadable): `find_games`'s list, and the `game.tw-pddl` files it left out because
    they cannot be read or parsed, each with the reason (missing: a dangling link; unreadable;
    invalid JSON; not a JSON object). One cheap JSON parse per game (which `solvable` needs anyway); a game whose
    files parse but fail to load later is an env failure of the worker that plays it."""
    root = Path(os.path.expandvars(str(root)))
    if split is not None and (root / split).is_dir():
        root = root / split
    games, unreadable = [], []
    # os.walk, not Path.rglob: rglob drops a dangling game.tw-pddl link silently (a missing game);
    # like rglob it does not descend into symlinked directories.
    found = [Path(d) / "game.tw-pddl" for d, dirs, files in os.walk(root) if "game.tw-pddl" in files + dirs]
    for path in sorted(found):
        if not (path.parent / "traj_data.json").exists():
            continue
        if "movable" in str(path.parent) or "Sliced" in str(path.parent):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                game = json.load(f)
        except OSError as e:
            unreadable.append((path, f"unreadable: {e.strerror or e}"))
            continue
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            unreadable.append((path, f"invalid JSON: {e}"))
            continue
        if not isinstance(game, dict):
            unreadable.append((path, f"not a JSON object ({type(game).__name__})"))
            continue
        if game.get("solvable", False):
            games.append(path)
    return games, unreadable


def versions() -> dict:
    """alfworld/textworld versions: recorded with every report (version drift breaks comparisons)."""
    return {"alfworld": version("alfworld"), "textworld": version("textworld")}
