"""Config loading and validation: TOML + typed CLI overrides, clear errors before any work."""

from pathlib import Path

import pytest

from trainer.config import ConfigError, build_config, parse_args, validate_for_world

REPO = Path(__file__).resolve().parents[2]


def _fake_hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    return d


def test_shipped_tiny_config_parses():
    cfg = parse_args(["--config", str(REPO / "configs/tiny-cpu.toml")])
    assert cfg.run.name == "tiny-cpu"
    assert cfg.run.stages == ["lm", "sft", "grpo"]
    assert cfg.rollout.group_size >= 2
    validate_for_world(cfg, 1)
    validate_for_world(cfg, 2)


@pytest.mark.parametrize("name", ["llama3-1b", "llama3-8b"])
def test_shipped_gpu_configs_parse_with_a_model_path(tmp_path, name):
    hf = _fake_hf_dir(tmp_path)
    cfg = parse_args(["--config", str(REPO / f"configs/{name}.toml"), f"--model.path={hf}"])
    assert cfg.model.path == str(hf)
    assert cfg.fsdp.param_dtype == "bfloat16"
    validate_for_world(cfg, 8)


def test_gpu_config_without_existing_model_path_stops(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path=.*does not exist"):
        parse_args(["--config", str(REPO / "configs/llama3-8b.toml"), f"--model.path={tmp_path / 'nope'}"])


def test_cli_overrides_are_typed():
    cfg = parse_args(
        [
            "--sft.steps=7",
            "--optim.lr",
            "0.5",
            "--run.stages=grpo",
            "--fsdp.activation_checkpointing=true",
            "--data.eval_splits=valid_seen,valid_unseen",
            "--resume",
        ]
    )
    assert cfg.sft.steps == 7 and isinstance(cfg.sft.steps, int)
    assert cfg.optim.lr == 0.5
    assert cfg.run.stages == ["grpo"]
    assert cfg.fsdp.activation_checkpointing is True
    assert cfg.data.eval_splits == ["valid_seen", "valid_unseen"]
    assert cfg.checkpoint.resume is True


def test_toml_int_is_accepted_for_float_but_not_the_reverse():
    assert build_config({"optim": {"lr": 1}}).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"sft\.steps: expected an int"):
        build_config({"sft": {"steps": 1.5}})
    with pytest.raises(ConfigError, match=r"sft\.steps: expected an int"):
        build_config({"sft": {"steps": True}})


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--sft.stepz=3"], r"unknown config key sft\.stepz"),
        (["--sfx.steps=3"], r"unknown config section 'sfx'"),
        (["--sft.steps=three"], r"sft\.steps: expected an int, got 'three'"),
        (["--eval.enabled=maybe"], r"eval\.enabled: expected a bool"),
        (["--eval.decoding=beam"], r"eval\.decoding='beam': 'greedy' or 'rank'"),
        (["--rollout.group_size=1"], r"rollout\.group_size must be >= 2"),
        (["--run.stages=sft,dpo"], r"unknown stages \['dpo'\]"),
        (["--data.states_path=/no/such/states.jsonl"], r"data\.states_path=.*does not exist"),
        (["--config", "/no/such.toml"], r"does not exist"),
        (["--sft.steps"], r"needs a value"),
        (["positional"], r"unexpected argument"),
        (["--model.n_heads=3"], r"model\.dim=128 not divisible by n_heads=3"),
    ],
)
def test_bad_configs_name_the_problem(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_batch_not_divisible_by_world_size():
    cfg = build_config({"sft": {"batch_size": 6}, "grpo": {"batch_size": 4}})
    validate_for_world(cfg, 2)
    with pytest.raises(ConfigError, match=r"sft\.batch_size=6 is not divisible by the world size 4"):
        validate_for_world(cfg, 4)
    # A stage that does not run is not checked.
    validate_for_world(build_config({"sft": {"batch_size": 6}, "run": {"stages": ["grpo"]}}), 4)


def test_hash_ignores_resume_flags_but_not_training_settings():
    a = build_config({})
    b = build_config({"checkpoint": {"resume": True}, "run": {"stop_after_step": 3}})
    c = build_config({"optim": {"lr": 0.123}})
    assert a.hash() == b.hash()
    assert a.hash() != c.hash()


def test_model_path_needs_a_tokenizer(tmp_path):
    hf = _fake_hf_dir(tmp_path)
    (hf / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"has no tokenizer\.json"):
        build_config({"model": {"path": str(hf)}})


def test_algo_flag_selects_the_rl_stage_after_the_pre_rl_stages():
    tiny = str(REPO / "configs/tiny-cpu.toml")  # stages ["lm", "sft", "grpo"]
    assert parse_args(["--config", tiny, "--algo", "ppo"]).run.stages == ["lm", "sft", "ppo"]
    assert parse_args(["--config", tiny, "--algo=grpo-multiturn"]).run.stages == [
        "lm",
        "sft",
        "grpo-multiturn",
    ]
    assert parse_args(["--config", tiny, "--algo", "sft"]).run.stages == ["lm", "sft"]
    assert parse_args(["--algo", "grpo"]).run.stages == ["sft", "grpo"]  # the default stages
    with pytest.raises(ConfigError, match="choose from"):
        parse_args(["--config", tiny, "--algo", "dpo"])
    with pytest.raises(ConfigError, match="give one"):
        parse_args(["--config", tiny, "--algo", "ppo", "--run.stages=sft"])
