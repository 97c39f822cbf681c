"""grpo-dagger: the policy-state pool (FIFO cap, mixing ratio, a pure function of the step), the
refresh play on real generated games (the states are the policy's own, labelled by the expert, the
same for the same seed), the registered stage's steps and budget counts, and its config checks."""

import json
import os
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from singleturn.harness.prompts import PromptFormat
from singleturn.trainer.config import ConfigError, RolloutConfig, build_config, parse_args
from singleturn.trainer.data import Example, batch_indices, build_examples
from singleturn.trainer.stages import STAGES, StageContext, StageSpan
from singleturn.trainer.stages.grpo_dagger import (
    PolicyPool,
    mixed_batch,
    play_policy_states,
    policy_share,
    refresh_due,
    refresh_games,
)

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("ALFWORLD_DATA", str(REPO / "data" / "alfworld"))


def _ex(tag) -> Example:
    return Example([1, 2, 3], [4], {"id": tag})


def _ids(examples) -> list:
    return [e.state["id"] for e in examples]


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("every", 0, r"dagger\.every must be >= 1"),
        ("every", -2, r"dagger\.every must be >= 1"),
        ("mix_ratio", -0.1, r"dagger\.mix_ratio must be in \[0, 1\], got -0\.1"),
        ("mix_ratio", 1.5, r"dagger\.mix_ratio must be in \[0, 1\], got 1\.5"),
        ("mix_ratio", float("nan"), r"dagger\.mix_ratio=nan must be a finite number"),
        ("pool_size", 0, r"dagger\.pool_size must be >= 1"),
        ("episodes", 0, r"dagger\.episodes must be >= 1"),
    ],
)
def test_bad_dagger_settings_are_config_errors(key, value, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"dagger": {key: value}})


def test_dagger_settings_from_the_cli():
    cfg = parse_args(
        ["--algo=grpo-dagger", "--dagger.every=2", "--dagger.mix_ratio=1", "--dagger.pool_size=7"]
    )
    assert cfg.run.stages[-1] == "grpo-dagger" and STAGES["grpo-dagger"].kind == "rl"
    assert (cfg.dagger.every, cfg.dagger.mix_ratio, cfg.dagger.pool_size) == (2, 1.0, 7)
    with pytest.raises(ConfigError, match=r"dagger\.mix_ratio must be in \[0, 1\]"):
        parse_args(["--dagger.mix_ratio=2"])
    with pytest.raises(ConfigError, match=r"unknown config key dagger\.k"):
        parse_args(["--dagger.k=2"])


def test_pool_is_capped_first_in_first_out():
    pool = PolicyPool(5)
    assert pool.add([_ex(i) for i in range(3)]) == 0 and len(pool) == 3
    assert pool.add([_ex(i) for i in range(3, 7)]) == 2
    assert _ids(pool.examples) == [2, 3, 4, 5, 6], "the oldest states go first"
    small = PolicyPool(4)
    assert small.add([_ex(i) for i in range(10)]) == 6 and _ids(small.examples) == [6, 7, 8, 9]


@pytest.mark.parametrize(
    "n, ratio, pool_len, k",
    [
        (8, 0.5, 10, 4),
        (8, 0.3, 10, 2),
        (7, 0.5, 10, 4),
        (37, 0.25, 100, 9),
        (8, 1.0, 3, 3),
        (8, 0.0, 10, 0),
        (8, 0.5, 0, 0),
    ],
)
def test_mixed_batch_honours_the_ratio_and_the_step(n, ratio, pool_len, k):
    expert = [_ex(("e", j)) for j in range(50)]
    pool = PolicyPool(100)
    pool.add([_ex(("p", j)) for j in range(pool_len)])
    assert policy_share(n, ratio, pool_len) == k
    tags = _ids(mixed_batch(expert, pool, 3, n, ratio=ratio, seed=1))
    policy = [t for t in tags if t[0] == "p"]
    assert len(tags) == n and len(policy) == k == len(set(policy)), tags
    grpo = [("e", j) for j in batch_indices(3, n, 50, 1)]
    assert sorted(t for t in tags if t[0] == "e") == sorted(grpo[: n - k]), "the rest: grpo's expert batch"
    assert _ids(mixed_batch(expert, pool, 3, n, ratio=ratio, seed=1)) == tags, "a pure function of the step"
    if k == 0:
        assert tags == grpo, "no policy states: exactly grpo's batch"
    else:
        assert _ids(mixed_batch(expert, pool, 4, n, ratio=ratio, seed=1)) != tags


def test_refresh_schedule_games_and_sample_bound():
    assert [i for i in range(12) if refresh_due(i, 4)] == [3, 7, 11]
    assert all(refresh_due(i, 1) for i in range(3))
    games = [f"g{i}" for i in range(10)]
    one = refresh_games(games, 2, episodes=4, seed=0, rank=0, world=1)
    assert one == [games[j] for j in batch_indices(2, 4, 10, 0)]
    split = [refresh_games(games, 2, episodes=4, seed=0, rank=r, world=3) for r in range(3)]
    assert [len(s) for s in split] == [2, 1, 1] and sorted(sum(split, [])) == sorted(one)
    assert refresh_games(games, 3, episodes=4, seed=0, rank=0, world=1) != one
    cfg = build_config(
        {
            "grpo": {"batch_size": 4, "oversample": 2},
            "rollout": {"group_size": 8},
            "dagger": {"episodes": 3, "max_steps": 5, "every": 4},
        }
    )
    per = STAGES["grpo-dagger"].samples_per_step(cfg)
    assert per == 4 * 2 * 8 + 4, "grpo's 64 + ceil(3 * 5 / 4) play decisions"
    for n in range(1, 30):  # n steps: at most n * 64 rollout samples + (n // 4) refreshes of <= 15
        assert n * 64 + (n // 4) * 15 <= n * per


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """2 generated train games, their expert states, a BPE tokenizer trained on the prompts."""
    from singleturn.harness import collect_states, generate_games, read_states, render_prompt
    from singleturn.model import train_tokenizer

    root = tmp_path_factory.mktemp("dagger_games")
    games = [
        str(g)
        for g in generate_games(root / "train", "train", 2, seed=0, task_types=["pick_and_place_simple"])
    ]
    collect_states(games, root / "expert.jsonl")
    expert = read_states(root / "expert.jsonl")
    texts = [m["content"] for s in expert for m in render_prompt(s, 2, False)] + [
        s["expert_action"] for s in expert
    ]
    return SimpleNamespace(root=root, games=games, expert=expert, tok=train_tokenizer(texts, 320))


def _model(tok):
    from singleturn.model import LlamaConfig, Transformer
    from singleturn.trainer.fsdp import apply_fsdp

    cfg = LlamaConfig(
        dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, ffn_dim=64, max_seq_len=2048
    )
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model, apply_fsdp(model)


def _any_admissible(text: str, admissible: list[str]) -> str:
    """Stand-in for harness.parse_action: every response names an admissible action (a function of
    the text), so an untrained model's samples move it around instead of all being no-ops."""
    return admissible[zlib.crc32(text.encode()) % len(admissible)]


def test_play_labels_the_policys_own_states(world, monkeypatch):
    import singleturn.harness.prompts as harness_prompts
    from singleturn.harness import render_prompt
    from singleturn.model.completion import encode_prompt
    from singleturn.model.episode_policy import EpisodePolicy

    monkeypatch.setattr(harness_prompts, "parse_action", _any_admissible)

    model, fsdp = _model(world.tok)
    asked: dict[tuple, list[str]] = {}  # prompt ids -> the responses the policy sampled for them
    real = EpisodePolicy.act_states

    def spy(self, states, keys=None):
        out = real(self, states, keys)
        for p, c in self.last:
            asked.setdefault(tuple(p), []).append(c.text)
        return out

    monkeypatch.setattr(EpisodePolicy, "act_states", spy)  # the act path every rollout samples through
    rcfg = RolloutConfig(max_new_tokens=6, temperature=1.0)

    def play(seed):
        return play_policy_states(
            model,
            fsdp,
            world.tok,
            world.games,
            rollout_cfg=rcfg,
            fmt=PromptFormat(history_window=2, system_prompt=False),
            max_steps=4,
            num_workers=1,
            seed=seed,
        )

    rows, counts = play(5)
    assert counts["decisions"] == sum(map(len, asked.values())) >= counts["env_steps"] == len(rows) > 0
    assert (
        counts["states"] == len(rows)
        and counts["env_failures"] == 0
        and 0 <= counts["won"] <= len(world.games)
    )
    walkthrough = {g: json.loads(Path(g).read_text())["walkthrough"] for g in world.games}
    by_game: dict[str, list[dict]] = {}
    for r in rows:
        by_game.setdefault(r["game"], []).append(r)
    assert set(by_game) == set(world.games)
    off_path = 0
    for game, steps in by_game.items():
        assert [r["step"] for r in steps] == list(range(len(steps))) and len(steps) <= 4
        assert steps[0]["expert_action"] == walkthrough[game][0], "the expert labels the start state"
        for prev, cur in zip(steps, steps[1:]):
            ids, _ = encode_prompt(world.tok, render_prompt(prev, 2, False), 2048 - 6)
            acted = {_any_admissible(t, prev["admissible"]) for t in asked[tuple(ids)]}
            assert cur["history"][-1][0] == prev["observation"] and cur["history"][-1][1] in acted, (
                f"{game} step {cur['step']}: the state does not follow the policy's action"
            )
            off_path += cur["history"][-1][1] != prev["expert_action"]
    assert all(r["expert_action"] in r["admissible"] for r in rows)
    assert off_path > 0, "an untrained policy leaves the expert's path: these are not the expert's states"
    again, _ = play(5)
    assert again == rows, "same seed, same weights: the same states"
    assert play(6)[0] != rows


def _stage(world, **dagger):
    from singleturn.trainer.optim import make_optimizer

    cfg = build_config(
        {
            "data": {
                "games_dir": str(world.root),
                "history_window": 2,
                "system_prompt": False,
                "max_seq_len": 2048,
            },
            "rollout": {"group_size": 2, "max_new_tokens": 6},
            "grpo": {"batch_size": 4, "oversample": 1, "micro_batch_size": 8, "lr": 1e-3},
            "dagger": {
                "every": 1,
                "episodes": 2,
                "max_steps": 2,
                "num_workers": 1,
                "mix_ratio": 0.5,
                "pool_size": 3,
                **dagger,
            },
        }
    )
    model, fsdp = _model(world.tok)
    examples, _ = build_examples(
        world.expert, world.tok, history_window=2, system_prompt=False, max_seq_len=2048
    )
    info = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    ctx = StageContext(model=model, fsdp=fsdp, tokenizer=world.tok, examples=examples, cfg=cfg, info=info)
    ctx.optimizer = make_optimizer(fsdp, cfg.optim, cfg.grpo.lr)
    return ctx, STAGES["grpo-dagger"](ctx, StageSpan("grpo-dagger", 1, 4))


def test_stage_mixes_policy_states_and_counts_the_budget(world):
    from singleturn.trainer.stages import local_examples

    ctx, stage = _stage(world)
    per = STAGES["grpo-dagger"].samples_per_step(ctx.cfg)
    row = stage.step(ctx, 0)  # every = 1: a refresh, then the GRPO step
    assert row["dagger_episodes"] == 2 and 0 < row["env_steps"] == row["dagger_states"] <= 2 * 2
    assert row["dagger_added"] + row["dagger_dropped"] == row["dagger_states"]
    assert row["pool_size"] == len(stage.pool) == min(3, row["dagger_added"])
    assert row["dagger_evicted"] == max(0, row["dagger_added"] - 3)
    assert row["policy_states"] == min(2, len(stage.pool)) > 0
    assert row["samples"] == row["groups"] * 2 + row["play_samples"] <= per
    assert row["play_samples"] >= row["env_steps"]
    # The play's training-episode win rate (harness.collect_states(episodes=)), no env failure here.
    assert 0 <= row["dagger_won"] <= row["dagger_episodes"] and row["dagger_env_failures"] == 0
    assert row["dagger_win_rate"] == row["dagger_won"] / row["dagger_episodes"]
    pool_ids = {id(e) for e in stage.pool.examples}
    assert sum(id(e) in pool_ids for e in stage.batch(ctx, 0)) == row["policy_states"]
    assert STAGES["grpo-dagger"].samples(ctx.cfg, [row]) == row["samples"]

    first = [e.state for e in stage.pool.examples]
    row1 = stage.step(ctx, 1)
    assert len(stage.pool) == 3 and row1["dagger_evicted"] == row1["dagger_added"] > 0, "capped FIFO"

    # A fresh stage, same seeds: the same policy states (the refresh precedes the step's update, so
    # the ratio does not matter); with mix_ratio 0 the batch is grpo's exactly.
    ctx0, fresh = _stage(world, mix_ratio=0.0)
    row0 = fresh.step(ctx0, 0)
    assert [e.state for e in fresh.pool.examples] == first
    assert row0["policy_states"] == 0 and fresh.batch(ctx0, 0) == local_examples(ctx0, 0, 4)

    # The pool goes through the checkpoint's stage state and comes back tokenized the same way.
    state = stage.state_dict()
    fresh.load_state_dict(state)
    assert [(e.prompt_ids, e.state) for e in fresh.pool.examples] == [
        (e.prompt_ids, e.state) for e in stage.pool.examples
    ]
