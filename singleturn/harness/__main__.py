"""CLI: `python -m singleturn.harness {generate,expert,evaluate,play} ...`.

    python -m singleturn.harness generate --out data/games/train --split train --num-games 60 --seed 0
    python -m singleturn.harness expert --games data/games/train --out data/states.jsonl [--expert planner]
    python -m singleturn.harness expert --games DIR --out dagger.jsonl --policy-states runs/x/final   # DAgger labels
    python -m singleturn.harness evaluate --games data/games/valid_unseen --policy random --out runs/eval/random
    python -m singleturn.harness play --game DIR/.../game.tw-pddl

Arguments are parsed before any game is loaded (fast-downward's translator overwrites sys.argv).
Exit codes: 0 done; 2 an expected failure, printed as one line `error: ...`; 1 an unexpected crash
(SINGLETURN_DEBUG=1 shows every traceback). Details: docs/pieces.md (harness/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from singleturn.harness.env import EXPERTS, AlfredGame
from singleturn.harness.evaluate import evaluate
from singleturn.harness.games import (
    SPLITS,
    TASK_TYPES,
    GenConfig,
    GenerationError,
    generate_games,
    scan_games,
)
from singleturn.harness.states import collect_states


def _int_at_least(low: int):
    """An argparse type: an int >= `low` (a step limit of 0 or -1 workers is an error, not a run)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"  # how argparse names the type in its messages
    return parse


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m singleturn.harness", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate expert-checked ALFWorld games")
    g.add_argument("--out", required=True)
    g.add_argument("--split", choices=SPLITS, required=True)
    g.add_argument("--num-games", type=_POSITIVE, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--task-types", nargs="+", choices=TASK_TYPES, default=None)
    g.add_argument("--workers", type=_POSITIVE, default=1)
    g.add_argument("--max-distractors", type=_NON_NEGATIVE, default=10)
    g.add_argument(
        "--max-expert-steps",
        type=_POSITIVE,
        default=50,
        help="keep games the handcoded expert wins within this",
    )

    def games_args(sp):
        sp.add_argument("--games", required=True, help="games directory or official data root")
        sp.add_argument("--split", choices=SPLITS, default=None)
        sp.add_argument(
            "--limit", type=_POSITIVE, default=None, help="use only the first N games (default: all)"
        )
        sp.add_argument("--workers", type=_POSITIVE, default=1)
        sp.add_argument(
            "--max-steps", type=_POSITIVE, default=None, help="default: the checkpoint's, else 50"
        )
        sp.add_argument("--expert", choices=EXPERTS, default="handcoded")
        sp.add_argument(
            "--history-window", type=_NON_NEGATIVE, default=None, help="default: the checkpoint's, else 3"
        )

    e = sub.add_parser("expert", help="write expert states (JSONL), or label a policy's states")
    games_args(e)
    e.add_argument("--out", required=True)
    e.add_argument("--policy-states", default=None, help="checkpoint dir: the policy acts, the expert labels")
    e.add_argument(
        "--beta", type=_probability, default=0.0, help="with --policy-states: P(expert acts) per step"
    )

    v = sub.add_parser("evaluate", help="multi-turn evaluation of a policy")
    games_args(v)
    v.add_argument("--policy", required=True, help="expert | random | <checkpoint dir>")
    v.add_argument("--out", default=None, help="report prefix: writes <out>.json and <out>.md")
    v.add_argument("--seed", type=int, default=0)

    pl = sub.add_parser("play", help="play one game in the terminal")
    pl.add_argument("--game", required=True)
    pl.add_argument("--expert", choices=EXPERTS, default="handcoded")
    return p


def _games(args):
    """The games to play; unreadable game files are skipped and named on stdout, not fatal."""
    games, unreadable = scan_games(args.games, args.split)
    if unreadable:
        listed = "; ".join(f"{path} ({why})" for path, why in unreadable)
        s = "" if len(unreadable) == 1 else "s"
        print(f"skipped {len(unreadable)} unreadable game{s}: {listed}", flush=True)
    if args.limit:
        games = games[: args.limit]
    if not games:
        raise _Refused(f"no games found under {args.games} (split={args.split})")
    return games


class _Refused(Exception):
    """An expected failure `main` prints as one line (exit 2)."""


def _checkpoint_policy(path: str, history_window: int | None = None):
    """(policy, PolicySpec) from an exported checkpoint dir (config.json, *.safetensors, tokenizer).

    `model.policy.load_policy` reads the run's `policy.json` (decoding, constraints, dtype, history
    window, system prompt, step limit), so the CLI plays exactly the policy the trainer evaluated.
    Imported lazily: only this CLI path needs torch; the library never does. A checkpoint that does
    not load (missing, truncated, not a checkpoint) is a `_Refused` naming it. `history_window`
    (the CLI flag, when given) overrides the spec's: the policy renders its own prompts.
    """
    from safetensors import SafetensorError  # a model dependency: only this CLI path loads weights

    from singleturn.model.policy import load_policy  # torch-free: the harness imports the model lazily

    try:
        policy, spec = load_policy(path)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise _Refused(f"checkpoint {path} does not load ({type(e).__name__}: {e})") from e
    if history_window is not None:
        policy.history_window = history_window
    return policy, spec


def _prompt_settings(args, spec) -> dict:
    """history window, system prompt and step limit: the flag when given, else the checkpoint's."""
    pick = lambda flag, saved: saved if flag is None else flag  # noqa: E731
    if spec is None:
        return {
            "history_window": pick(args.history_window, 3),
            "system_prompt": True,
            "max_steps": pick(args.max_steps, 50),
        }
    return {
        "history_window": pick(args.history_window, spec.history_window),
        "system_prompt": spec.system_prompt,
        "prompt": spec.prompt,
        "list_admissible": spec.list_admissible,
        "max_steps": pick(args.max_steps, spec.max_steps),
    }


def main(argv=None) -> int:
    args = _parser().parse_args(argv)  # before any game loads (the translator rewrites sys.argv)
    try:
        _run(args)
    except (_Refused, GenerationError, OSError) as e:  # OSError: a missing or unwritable path
        if os.environ.get("SINGLETURN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def _run(args) -> None:
    if args.cmd == "generate":
        t0 = time.perf_counter()
        paths = generate_games(
            args.out,
            args.split,
            args.num_games,
            args.seed,
            args.task_types,
            num_workers=args.workers,
            config=GenConfig(max_distractors=args.max_distractors, max_expert_steps=args.max_expert_steps),
        )
        manifest = json.loads((Path(args.out) / "manifest.json").read_text())
        print(
            f"{len(paths)} games in {args.out} ({time.perf_counter() - t0:.1f}s; "
            f"regenerated {manifest.get('regenerated', 0)} unsolvable draws)"
        )
    elif args.cmd == "expert":
        games = _games(args)
        policy, spec = (
            _checkpoint_policy(args.policy_states, args.history_window)
            if args.policy_states
            else (None, None)
        )
        t0 = time.perf_counter()
        n = collect_states(
            games,
            args.out,
            expert=args.expert,
            policy=policy,
            beta=args.beta,
            num_workers=args.workers,
            batch_size=spec.batch_size if spec is not None else None,
            **_prompt_settings(args, spec),
        )
        print(f"{n} states from {len(games)} games -> {args.out} ({time.perf_counter() - t0:.1f}s)")
    elif args.cmd == "evaluate":
        games = _games(args)
        policy, spec = (
            (args.policy, None)
            if args.policy in ("expert", "random")
            else _checkpoint_policy(args.policy, args.history_window)
        )
        report = evaluate(
            policy,
            games,
            num_workers=args.workers,
            expert=args.expert,
            seed=args.seed,
            # a checkpoint's policy holds spec.batch_size cache rows: never more live episodes
            batch_size=spec.batch_size if spec is not None else None,
            **_prompt_settings(args, spec),
        )
        print(report.to_markdown())
        if args.out:
            js, md = report.write(args.out)
            print(f"wrote {js} and {md}")
    elif args.cmd == "play":
        _play(args.game, args.expert)


def _play(game_path: str, expert: str) -> None:
    game = AlfredGame(expert)
    game.load(game_path)
    res = game.reset(seed=0)
    print(res.observation)
    while not res.won:
        print(f"\n[expert: {res.expert_action}]  admissible: {', '.join(res.admissible)}")
        try:
            command = input("> ").strip()
        except EOFError:
            return
        if command in ("quit", "exit"):
            return
        res = game.step(command)
        print(res.observation)
    print("\nYou won!")


if __name__ == "__main__":
    sys.exit(main())
