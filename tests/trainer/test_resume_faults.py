"""A resume after a partial failure loses and mixes nothing (issue 23): refused resumes leave the
run directory as it was, and a resume that finds evaluations without their checkpoints says so.

In-process runs (a plain process is world size 1: no torchrun) of a ~20k-parameter model on a toy
states file and a tokenizer trained on it (no ALFWorld); SFT only, evaluation off.
"""

import json
import random

import pytest

from singleturn.trainer.config import ConfigError, build_config
from singleturn.trainer.dist import init_distributed
from singleturn.trainer.train import Trainer

_PLACES = ["desk", "shelf", "table", "drawer"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(states.jsonl, tokenizer.json): 16 toy states in the harness schema and a BPE trained on them."""
    from singleturn.harness import render_prompt
    from singleturn.model import train_tokenizer

    root, rng = tmp_path_factory.mktemp("inputs"), random.Random(0)
    rows = []
    for i in range(16):
        place = rng.choice(_PLACES)
        rows.append(
            {
                "game": f"toy/{i}",
                "task_type": "pick_and_place_simple",
                "step": 0,
                "goal": f"look at {place}",
                "history": [],
                "observation": f"You see a {place} 1.",
                "admissible": [f"go to {p} 1" for p in _PLACES] + ["look"],
                "expert_action": f"go to {place} 1",
            }
        )
    states = root / "states.jsonl"
    states.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [m["content"] for r in rows for m in render_prompt(r, history_window=1)] + [
        r["expert_action"] for r in rows
    ]
    tok = root / "tokenizer.json"
    train_tokenizer(texts, 300).save(str(tok))
    return states, tok


def _cfg(root, inputs, **sections):
    states, tok = inputs
    raw = {
        "run": {"name": "r", "out_dir": str(root), "num_threads": 1, "plots": False, "stages": ["sft"]},
        "data": {
            "states_path": str(states),
            "tokenizer_path": str(tok),
            "games_dir": str(root / "games"),
            "history_window": 1,
            "max_seq_len": 512,
        },
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64, "max_seq_len": 512},
        "sft": {"steps": 2, "batch_size": 4, "micro_batch_size": 4},
        "eval": {"enabled": False},
        "checkpoint": {"every": 1, "export_final": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return build_config(raw)


def _train(cfg) -> None:
    trainer = Trainer(cfg, init_distributed())
    try:
        trainer.train()
    finally:
        trainer.lock.release()


def test_a_refused_resume_writes_no_config_json(tmp_path, inputs):
    """config.json gone, `--resume --optim.lr=5e-3`: the checkpoint's config hash refuses it, and
    config.json must stay absent, so the same run still resumes with its own settings."""
    _train(_cfg(tmp_path, inputs, run={"stop_after_step": 1}))
    run_dir = tmp_path / "r"
    (run_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match="written with a different config"):
        Trainer(_cfg(tmp_path, inputs, optim={"lr": 5e-3}, checkpoint={"resume": True}), init_distributed())
    assert not (run_dir / "config.json").exists(), "the refused resume wrote config.json"
    _train(_cfg(tmp_path, inputs, checkpoint={"resume": True}))  # not refused: lock released, no config
    assert json.loads((run_dir / "config.json").read_text())["optim"]["lr"] == 1e-3
    assert (run_dir / "checkpoints" / "step_2").is_dir()


@pytest.mark.parametrize(
    "damage", ["", '{"success_rate": 0.5, "act', "[1, 2]"], ids=["empty", "partial", "list"]
)
def test_a_damaged_eval_json_is_named_in_the_error(tmp_path, inputs, damage):
    """An empty or partial eval/<label>.json used to stop every resume with a bare JSONDecodeError."""
    from singleturn.trainer.run_dir import RunDirError

    _train(_cfg(tmp_path, inputs))
    path = tmp_path / "r" / "eval" / "sft.json"
    path.parent.mkdir()
    path.write_text(damage)
    with pytest.raises(RunDirError, match=rf"{path} is unreadable .*delete it to evaluate 'sft' again"):
        _train(_cfg(tmp_path, inputs, checkpoint={"resume": True}))


def test_atomic_write_leaves_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    """eval/<label>.json, config.json, timings.json: a failed write keeps the previous contents."""
    import errno
    import os

    from singleturn.harness.atomic import write_text_atomic

    path = tmp_path / "sft.json"
    write_text_atomic(path, '{"old": 1}')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["sft.json"]


def test_a_run_with_zero_steps_and_plots_on_finishes(tmp_path, inputs):
    """Every stage at 0 steps with plots on: write_plots crashed on the missing metrics.jsonl after
    final/ was exported (issue 23, fault 10)."""
    _train(_cfg(tmp_path, inputs, sft={"steps": 0}, run={"plots": True}, checkpoint={"export_final": True}))
    run_dir = tmp_path / "r"
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "timings.json").is_file()
    assert not (run_dir / "plots").exists(), "plots of nothing"
    assert (run_dir / "final" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_resume_without_checkpoints_refuses_next_to_trained_outputs(tmp_path, inputs):
    """checkpoints/ gone, final/ and eval/sft.json kept: `--resume` used to print "starting from
    scratch", retrain, replace final/ and keep the old evaluations in the table (issue 23, fault 4)."""
    import shutil

    from singleturn.trainer.run_dir import RunDirError

    _train(_cfg(tmp_path, inputs, checkpoint={"export_final": True}))
    run_dir = tmp_path / "r"
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "sft.json").write_text('{"success_rate": 0.5}')
    (run_dir / "eval" / "random.json").write_text('{"success_rate": 0.0}')
    shutil.rmtree(run_dir / "checkpoints")
    final = (run_dir / "final" / "model.safetensors").read_bytes()
    with pytest.raises(
        RunDirError, match=r"no checkpoint, but holds outputs of trained weights \(final, eval/sft\.json\)"
    ):
        _train(_cfg(tmp_path, inputs, checkpoint={"resume": True}))
    assert (run_dir / "final" / "model.safetensors").read_bytes() == final
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, inputs):
    """Killed before its first checkpoint: only step-0 outputs (the random baseline) exist, which a
    restart from step 0 reproduces; the resume starts from scratch and keeps them."""
    run_dir = tmp_path / "r"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "random.json").write_text('{"success_rate": 0.0}')
    _train(_cfg(tmp_path, inputs, checkpoint={"resume": True}))
    assert (run_dir / "checkpoints" / "step_2").is_dir() and (run_dir / "eval" / "random.json").is_file()
