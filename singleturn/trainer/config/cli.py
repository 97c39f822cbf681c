"""TOML files and `--section.key=value` overrides -> TrainConfig; TOML in and out."""

from __future__ import annotations

import json
import typing
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from singleturn.trainer.config.auto_dtype import resolve_auto_dtypes
from singleturn.trainer.config.checks import ConfigError
from singleturn.trainer.config.sections import RunConfig
from singleturn.trainer.config.train_config import TrainConfig
from singleturn.trainer.stages import STAGES

_SECTIONS = typing.get_type_hints(TrainConfig)


def _section_cls(name: str):
    return _SECTIONS[name]


def _coerce(section: str, key: str, tp, value, from_cli: bool):
    """Value of field `section.key` with type `tp`, from TOML (typed) or the CLI (a string)."""
    where = f"{section}.{key}"
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if from_cli:
            items = [v.strip() for v in value.split(",") if v.strip()]
        else:
            if not isinstance(value, list):
                raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            items = value
        return [_coerce(section, key, item_tp, v, from_cli) for v in items]
    if tp is bool:
        if from_cli:
            low = value.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ConfigError(f"{where}: expected a bool (true/false), got {value!r}")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected a bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if from_cli:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an int, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if from_cli:
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not from_cli and not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def build_config(raw: dict[str, dict], overrides: dict[str, dict[str, str]] | None = None) -> TrainConfig:
    """TrainConfig from a TOML-like dict of sections plus string overrides {section: {key: value}}."""
    sections = {}
    merged: dict[str, dict] = {}
    for src, from_cli in ((raw, False), (overrides or {}, True)):
        for section, values in src.items():
            if section not in _SECTIONS:
                raise ConfigError(f"unknown config section {section!r}; sections: {sorted(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a table, got {values!r}")
            types = _field_types(_section_cls(section))
            for key, value in values.items():
                if key not in types:
                    raise ConfigError(
                        f"unknown config key {section}.{key}; keys of [{section}]: {sorted(types)}"
                    )
                merged.setdefault(section, {})[key] = _coerce(section, key, types[key], value, from_cli)
    for section in _SECTIONS:
        sections[section] = _section_cls(section)(**merged.get(section, {}))
    return TrainConfig(**sections)


def algos() -> tuple[str, ...]:
    """`--algo` choices: 'sft' (no RL stage) and every registered RL stage."""
    return ("sft", *(n for n, s in STAGES.items() if s.kind == "rl"))


def algo_stages(stages: list[str], algo: str) -> list[str]:
    """The config's pre-RL stages (lm, sft; 'sft' added if absent) followed by `algo`'s RL stage."""
    if algo not in algos():
        raise ConfigError(f"--algo {algo!r}: choose from {list(algos())}")
    pre = [s for s in stages if s in STAGES and STAGES[s].kind != "rl"]
    pre = pre if "sft" in pre else [*pre, "sft"]
    return pre if algo == "sft" else [*pre, algo]


def parse_args(argv: list[str]) -> TrainConfig:
    """`--config X.toml [--algo A] [--section.key=value | --section.key value ...] [--resume | --overwrite]`.

    --resume sets checkpoint.resume, --overwrite checkpoint.overwrite (both flags take no value).

    --algo A (sft | grpo | ppo | grpo-multiturn | grpo-dagger) keeps the config's pre-RL stages and runs algorithm
    A after them: `--algo ppo` on a ["lm", "sft", "grpo"] config runs ["lm", "sft", "ppo"].
    """
    config_path = algo = None
    overrides: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --config PATH and --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if name in ("resume", "overwrite") and not eq:
            overrides.setdefault("checkpoint", {})[name] = "true"
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "config":
            config_path = value
            continue
        if name == "algo":
            algo = value
            continue
        section, dot, key = name.partition(".")
        if not dot or not key:
            raise ConfigError(f"bad override --{name}; expected --section.key=value")
        overrides.setdefault(section, {})[key] = value
    raw: dict = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {config_path!r} does not exist")
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:  # its message ends with "(at line L, column C)"
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if algo is not None:
        if "stages" in overrides.get("run", {}):
            raise ConfigError("--algo and --run.stages both set the stages; give one")
        stages = raw.get("run", {}).get("stages", RunConfig().stages)
        raw = {**raw, "run": {**raw.get("run", {}), "stages": algo_stages(list(stages), algo)}}
    return resolve_auto_dtypes(build_config(raw, overrides))


def format_config(cfg: TrainConfig) -> str:
    """The resolved config as TOML-ish text, for the one-time print on rank 0."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"  {k} = {json.dumps(v)}" for k, v in values.items())
    return "\n".join(lines)


def load_toml(path: str | Path) -> dict:
    """A TOML file as a dict; a syntax error is a ConfigError naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:  # its message ends with "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


def dump_toml(raw: dict[str, dict]) -> str:
    """TOML text of a {section: {key: value}} dict (the one writer: JSON scalars and lists are TOML)."""
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)
