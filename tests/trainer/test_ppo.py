"""The multi-turn baselines: episode collection in real ALFWorld envs, advantages, and learning.

- `collect_episodes` on generated games: every turn's recorded log-probs are the policy's own
  (teacher-forced recomputation agrees), prompts are the single-turn chat format, features are the
  hidden state at the last prompt token.
- `ppo` and `grpo-multiturn` steps (the real registered stages: sequences, GAE / group advantages,
  value head, kernels.grpo_loss update) on a trivially learnable two-turn toy task that stands in for
  the env: the episode is won when the first sampled token of BOTH turns is in the "good" half of
  the vocabulary. The exact probability of a good token must rise within a few steps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import singleturn.trainer.stages.multiturn as mt_mod
from singleturn.harness.prompts import PromptFormat
from singleturn.trainer.config import RolloutConfig, build_config
from singleturn.trainer.episodes import CollectStats, EpisodeRollout, Turn, step_games
from singleturn.trainer.optim import make_optimizer
from singleturn.trainer.stages import STAGES, StageContext, StageSpan
from singleturn.trainer.stages.grpo_multiturn import group_episode_advantages
from singleturn.trainer.stages.ppo import ppo_advantages

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("ALFWORLD_DATA", str(REPO / "data" / "alfworld"))

V = 64  # toy vocabulary
TOY_PROMPTS = [[2, 10, 11], [2, 12, 13, 14]]  # turn 0 and turn 1 (game id appended)


def _tiny_model(vocab: int, seed: int = 0, max_seq_len: int = 512):
    from singleturn.model import LlamaConfig, Transformer

    cfg = LlamaConfig(
        dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_dim=64, max_seq_len=max_seq_len
    )
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    return model


def _toy_collect(model, fsdp, tokenizer, games, *, rollout_cfg, seed, with_features, device, **_):
    """Stand-in for the env: 2 turns per episode, won iff both turns' first token < V // 2."""
    from singleturn.model import generate
    from singleturn.trainer.value import state_features

    episodes = []
    with fsdp.summon_full_params(dtype=torch.float32), torch.no_grad():
        prompts = [p + [20 + int(g[3:])] for g in games for p in TOY_PROMPTS]  # (episode, turn) major
        s = generate(
            model,
            prompts,
            num_samples=1,
            max_new_tokens=1,
            temperature=rollout_cfg.temperature,
            top_p=1.0,
            stop_ids=(1,),
            seed=seed,
            pad_id=0,
        )
        feats = state_features(model, prompts, pad_id=0, device=device) if with_features else None
    for e, g in enumerate(games):
        turns = []
        for t in range(2):
            i = 2 * e + t
            tok = int(s.tokens[i, 0])
            turns.append(Turn(prompts[i], [tok], s.logprobs[i, :1].clone(), str(tok), tok < V // 2))
        won = all(t.expert_match for t in turns)
        ep = EpisodeRollout(game=g, task_type="toy", won=won, failed=False, turns=turns)
        ep.features = None if feats is None else feats[2 * e : 2 * e + 2]
        episodes.append(ep)
    n = 2 * len(games)
    return episodes, CollectStats(len(games), n, n, n, sum(len(p) for p in prompts), 0, 0.0)


def _good_prob(model) -> float:
    """Mean over toy games and turns of P(first token < V/2) under the model (T = 1)."""
    with torch.no_grad():
        probs = []
        for g in range(8):
            for p in TOY_PROMPTS:
                logits = model(torch.tensor([p + [20 + g]]))[0, -1]  # (V,)
                probs.append(float(torch.softmax(logits.float(), -1)[: V // 2].sum()))
    return sum(probs) / len(probs)


def _build_stage(algo: str, cfg, info, total: int):
    """(model, fsdp, ctx, stage) of a registered multi-turn stage on a fresh tiny model."""
    from singleturn.trainer.fsdp import apply_fsdp

    torch.manual_seed(0)
    model = _tiny_model(V)
    fsdp = apply_fsdp(model)
    tok = SimpleNamespace(pad_id=0, eot_id=1)
    ctx = StageContext(model=model, fsdp=fsdp, tokenizer=tok, examples=[], cfg=cfg, info=info)
    ctx.optimizer = make_optimizer(fsdp, cfg.optim, cfg.ppo.lr)
    return model, fsdp, ctx, STAGES[algo](ctx, StageSpan(algo, 1, total))


def _toy_config(micro_batch_size: int):
    """Both multi-turn sections with the same rollout and update settings."""
    shared = {"episodes_per_step": 16, "micro_batch_size": micro_batch_size, "lr": 1e-2}
    return build_config(
        {
            "ppo": {**shared, "value_lr": 3e-2},
            "grpo_multiturn": {**shared, "group_size": 4},
            "rollout": {"max_new_tokens": 1},
            "optim": {"lr": 1e-2},
        }
    )


def _stage(monkeypatch, algo: str):
    monkeypatch.setattr(mt_mod, "collect_episodes", _toy_collect)
    monkeypatch.setattr(mt_mod, "train_games", lambda data_cfg: [f"toy{i}" for i in range(8)])
    cfg = _toy_config(micro_batch_size=64)
    info = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    model, fsdp, ctx, stage = _build_stage(algo, cfg, info, 8)
    stage.ctx = ctx  # the tests step it as stage.step(stage.ctx, i)
    return model, fsdp, stage


@pytest.mark.parametrize("algo", ["ppo", "grpo-multiturn"])
def test_multiturn_algorithms_learn_toy_task(monkeypatch, algo):
    model, fsdp, stage = _stage(monkeypatch, algo)
    with fsdp.summon_full_params(dtype=torch.float32):
        before = _good_prob(model)
    rows = [stage.step(stage.ctx, i) for i in range(8)]
    with fsdp.summon_full_params(dtype=torch.float32):
        after = _good_prob(model)
    assert all(not r.get("skipped") for r in rows[:2]), rows[:2]
    assert rows[0]["samples"] == 32 and rows[0]["episodes"] == 16
    assert after > before + 0.15, f"{algo}: P(good token) {before:.3f} -> {after:.3f}; rows {rows}"
    late = sum(r["success_rate"] for r in rows[-3:]) / 3
    assert late > rows[0]["success_rate"], f"{algo}: success {rows[0]['success_rate']:.3f} -> {late:.3f}"
    if algo == "ppo":
        # The critic starts at V = 0 and learns to predict the success rate of the improving policy.
        assert rows[0]["value_mean"] == 0.0
        v_late = sum(r["value_mean"] for r in rows[-3:]) / 3
        assert v_late > 0.2 and abs(v_late - late) < 0.2, [(r["value_mean"], r["success_rate"]) for r in rows]


def test_ppo_advantages_hand_computed():
    # Two episodes: won in 2 turns (V = [0.5, 0.5]) and lost in 1 (V = [0.2]); gamma 1, lam 1:
    # returns = [1, 1] and [0]; advantages = [0.5, 0.5] and [-0.2] (no whitening).
    cfg = build_config({"ppo": {"gamma": 1.0, "lam": 1.0, "adv_whiten": False}}).ppo
    t = Turn([1], [2], torch.zeros(1), "a", True)
    eps = [
        EpisodeRollout("g", "x", True, False, [t, t]),
        EpisodeRollout("g", "x", False, False, [t]),
    ]
    adv, ret = ppo_advantages(eps, [torch.tensor([0.5, 0.5]), torch.tensor([0.2])], cfg)
    assert torch.allclose(adv[0], torch.tensor([0.5, 0.5])) and torch.allclose(adv[1], torch.tensor([-0.2]))
    assert torch.allclose(ret[0], torch.tensor([1.0, 1.0])) and torch.allclose(ret[1], torch.tensor([0.0]))
    cfg = build_config({"ppo": {"adv_whiten": True, "gamma": 1.0, "lam": 1.0}}).ppo
    adv, _ = ppo_advantages(eps, [torch.tensor([0.5, 0.5]), torch.tensor([0.2])], cfg)
    flat = torch.cat(adv)
    assert abs(float(flat.mean())) < 1e-6 and abs(float(flat.std(unbiased=False)) - 1) < 1e-4
    assert ppo_advantages([], [], cfg) == ([], []), "a rank without live episodes still joins"


def test_group_episode_advantages_and_games():
    t = Turn([1], [2], torch.zeros(1), "a", True)
    wins = [True, False, False, False, True, True, True, True]
    eps = [EpisodeRollout("g", "x", w, False, [t] * (i + 1)) for i, w in enumerate(wins)]
    adv, zero = group_episode_advantages(eps, 4, success_discount=1.0, adv_scale="none")
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert zero == 1
    # discounted: won after 5 / 6 / 7 / 8 turns -> group of different rewards
    adv, zero = group_episode_advantages(eps, 4, success_discount=0.5, adv_scale="none")
    r = torch.tensor([0.5**4, 0.5**5, 0.5**6, 0.5**7])
    assert zero == 0 and torch.allclose(adv[4:], r - r.mean())
    games = [f"g{i}" for i in range(10)]
    local = step_games(games, 3, episodes=8, group_size=4, seed=0, rank=1, world=2)
    assert len(local) == 4 and len(set(local)) == 1, "one game per rank, repeated G times"
    both = step_games(games, 3, episodes=8, group_size=4, seed=0, rank=0, world=1)
    assert both[4:] == local


def test_stage_spans_cover_multiturn_stages():
    cfg = build_config({"run": {"stages": ["sft", "ppo"]}, "sft": {"steps": 3}, "ppo": {"steps": 2}})
    from singleturn.trainer.stages import stage_spans

    spans = stage_spans(cfg)
    assert [(s.name, s.first, s.last) for s in spans] == [("sft", 1, 3), ("ppo", 4, 5)]


@pytest.fixture(scope="module")
def real_games(tmp_path_factory):
    from singleturn.harness import generate_games

    root = tmp_path_factory.mktemp("mt_games")
    return [
        str(g)
        for g in generate_games(root / "train", "train", 2, seed=0, task_types=["pick_and_place_simple"])
    ]


def test_collect_episodes_records_the_policys_own_turns(real_games):
    from singleturn.harness import render_prompt
    from singleturn.model import train_tokenizer
    from singleturn.trainer.data import pack_completions
    from singleturn.trainer.episodes import collect_episodes
    from singleturn.trainer.forward_backward import action_logprobs
    from singleturn.trainer.fsdp import apply_fsdp

    tok = train_tokenizer(["go to countertop 1", "take cloth 1 from sinkbasin 1", "Your task is to"], 300)
    torch.manual_seed(0)
    model = _tiny_model(tok.vocab_size, max_seq_len=2048)
    fsdp = apply_fsdp(model)
    rcfg = RolloutConfig(max_new_tokens=6, temperature=1.0)
    games = [real_games[0], real_games[0], real_games[1]]
    eps, stats = collect_episodes(
        model,
        fsdp,
        tok,
        games,
        rollout_cfg=rcfg,
        fmt=PromptFormat(history_window=1),
        max_steps=2,
        max_seq_len=2048,
        seed=3,
        device="cpu",
        num_workers=1,
        with_features=True,
    )
    assert [e.game for e in eps] == games
    assert all(not e.failed and e.steps == 2 for e in eps), [(e.failed, e.steps) for e in eps]
    assert stats.samples == stats.env_steps == 6 and stats.truncated_prompts == 0
    first = eps[0].turns[0]
    assert first.expert_match is not None
    # The first prompt is the single-turn format of the game's initial state.
    assert (
        tok.decode(first.prompt).find(
            render_prompt({"goal": "", "observation": "", "admissible": []})[0]["content"][:40]
        )
        >= 0
    )
    turns = [t for e in eps for t in e.turns]
    packed = pack_completions([t.prompt for t in turns], [t.response for t in turns], pad_id=tok.pad_id)
    with torch.no_grad(), fsdp.summon_full_params(dtype=torch.float32):
        logp = action_logprobs(model, lambda: model.output.weight, packed)  # (N,)
        h = model.hidden(torch.tensor([first.prompt]))[0, -1]
    old = torch.cat([t.logprobs for t in turns])
    err = (logp - old).abs().max()
    assert err < 1e-4, f"recorded sampling log-probs differ from the policy's by {float(err):.3g}"
    assert eps[0].features.shape == (2, 32)
    assert torch.allclose(eps[0].features[0], h, atol=1e-5)


def test_collect_episodes_in_the_episode_format_grows_one_conversation(real_games):
    """fmt=PromptFormat('episode'): each turn's prompt is the episode conversation so far (the
    per-state ids an EpisodeCache would hold), so turn t+1's prompt extends turn t's."""
    from singleturn.model import train_tokenizer
    from singleturn.trainer.episodes import collect_episodes
    from singleturn.trainer.fsdp import apply_fsdp

    tok = train_tokenizer(["go to countertop 1", "take cloth 1 from sinkbasin 1", "Your task is to"], 300)
    torch.manual_seed(0)
    model = _tiny_model(tok.vocab_size, max_seq_len=4096)
    fmt = PromptFormat("episode", system_prompt=False, list_admissible=False)
    eps, stats = collect_episodes(
        model,
        apply_fsdp(model),
        tok,
        [real_games[0]],
        rollout_cfg=RolloutConfig(max_new_tokens=6, temperature=1.0),
        fmt=fmt,
        max_steps=3,
        max_seq_len=4096,
        seed=3,
        device="cpu",
        num_workers=1,
        with_features=True,
    )
    turns = eps[0].turns
    assert len(turns) == 3 and stats.truncated_prompts == 0
    with torch.no_grad():  # the critic's features, read off the last turn's forward, equal each turn's own
        for t, feat in zip(turns, eps[0].features):
            torch.testing.assert_close(
                feat, model.hidden(torch.tensor([t.prompt]))[0, -1], rtol=1e-5, atol=1e-5
            )
    text = tok.decode(turns[0].prompt)
    assert "Your task is to:" in text and "Admissible actions" not in text and text.count("Observation:") == 1
    for a, b in zip(turns, turns[1:]):
        assert b.prompt[: len(a.prompt)] == a.prompt  # append-only
    assert tok.decode(turns[2].prompt).count("Observation:") == 3


@pytest.mark.parametrize("kind", ["episode", "window"])
def test_rollouts_over_the_cache_equal_re_encoding_each_prompt(real_games, per_state_policy, kind):
    """The rollouts run over each episode's KV cache (model.EpisodePolicy, sampled): every turn's
    prompt ids, sampled ids, log-probs and parsed action equal what re-encoding each state's whole
    prompt and sampling it (the cache-free reference, `generate`) gives with the same seeds, a game
    played twice at once (a group) included, in both prompt formats."""
    from singleturn.harness import parse_action
    from singleturn.harness.rollout import run_episodes
    from singleturn.model import train_tokenizer
    from singleturn.trainer.episodes import collect_episodes
    from singleturn.trainer.fsdp import apply_fsdp

    tok = train_tokenizer(["go to countertop 1", "take cloth 1 from sinkbasin 1", "Your task is to"], 300)
    torch.manual_seed(0)
    model = _tiny_model(tok.vocab_size, max_seq_len=4096)
    fmt = PromptFormat(kind, history_window=1, system_prompt=False, list_admissible=True)
    rcfg = RolloutConfig(max_new_tokens=6, temperature=0.9, top_p=0.95)
    games = [real_games[0], real_games[0], real_games[1]]
    eps, stats = collect_episodes(
        model,
        apply_fsdp(model),
        tok,
        games,
        rollout_cfg=rcfg,
        fmt=fmt,
        max_steps=3,
        max_seq_len=4096,
        seed=3,
        device="cpu",
        num_workers=1,
    )
    ref: dict[int, list] = {i: [] for i in range(len(games))}
    sampling = {"temperature": 0.9, "top_p": 0.95, "top_k": 0, "max_new_tokens": 6}
    policy = per_state_policy(model, tok, decoding="sample", max_len=4096, sampling=sampling, seed=3)
    pending = []

    def act(states):
        policy([fmt.messages(s) for s in states], [s["admissible"] for s in states])
        idx = pending[-len(states) :]
        del pending[-len(states) :]
        out = [parse_action(c.text, s["admissible"]) for s, (_, c) in zip(states, policy.last)]
        for i, (p, c), a in zip(idx, policy.last, out):
            ref[i].append((p, c.tokens, c.logprobs, a))
        return out

    with torch.no_grad():
        run_episodes(
            games, act, max_steps=3, batch_size=8, num_workers=1, on_state=lambda s, i: pending.append(i)
        )
    assert stats.samples == sum(len(v) for v in ref.values()) >= 6
    for i, ep in enumerate(eps):
        assert len(ep.turns) == len(ref[i])
        for t, (p, ids, logp, a) in zip(ep.turns, ref[i]):
            assert (t.prompt, t.response, t.action) == (p, ids, a)
            torch.testing.assert_close(t.logprobs, logp, rtol=1e-4, atol=1e-5)
    assert eps[0].turns[0].prompt == eps[1].turns[0].prompt  # the group's two copies of one game
    assert [t.response for t in eps[0].turns] != [t.response for t in eps[1].turns]  # drawn apart


def _worker(out: Path) -> None:
    """2-rank gloo run of both stages on the toy task (launched by the test below via torchrun)."""
    from singleturn.trainer.dist import destroy, init_distributed

    info = init_distributed()
    torch.set_num_threads(1)
    mt_mod.collect_episodes = _toy_collect
    mt_mod.train_games = lambda data_cfg: [f"toy{i}" for i in range(8)]
    result = {}
    for algo in ("ppo", "grpo-multiturn"):
        cfg = _toy_config(micro_batch_size=3)
        model, fsdp, ctx, stage = _build_stage(algo, cfg, info, 6)
        with fsdp.summon_full_params(dtype=torch.float32):
            before = _good_prob(model)
        rows = [stage.step(ctx, i) for i in range(6)]
        with fsdp.summon_full_params(dtype=torch.float32):
            after = _good_prob(model)
        head = [p.detach().flatten().tolist() for p in stage.value_head.parameters()] if algo == "ppo" else []
        result[algo] = {"before": before, "after": after, "rows": rows, "head": head}
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    destroy()


@pytest.mark.slow  # ~40 s: two torchrun ranks
def test_multiturn_stages_on_two_ranks(tmp_path):
    """Uneven per-rank turn counts, FSDP micro-batch padding, the replicated value head and the global
    whitening all run on 2 gloo ranks: both ranks end with the same model and critic, and learn."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        "--worker",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"workers failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    for algo in ("ppo", "grpo-multiturn"):
        a, b = r0[algo], r1[algo]
        assert a["after"] == b["after"], (
            f"{algo}: ranks disagree on the policy ({a['after']} vs {b['after']})"
        )
        assert a["head"] == b["head"], f"{algo}: the replicated value head diverged across ranks"
        assert [x["samples"] for x in a["rows"]] == [32] * 6, "global samples (16 episodes x 2 turns)"
        assert a["after"] > a["before"] + 0.1, f"{algo}: P(good) {a['before']:.3f} -> {a['after']:.3f}"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(Path(sys.argv[sys.argv.index("--worker") + 1]))


def test_ppo_critic_round_trips_through_checkpoint_extra(monkeypatch):
    """The value head and its AdamW state go into the checkpoint's `extra` and come back exactly;
    a resumed stage then continues the critic instead of restarting it from zero."""
    _, _, stage = _stage(monkeypatch, "ppo")
    for step in range(1, 3):
        stage.step(stage.ctx, step - 1)
    state = stage.state_dict()
    assert set(state) == {"value_head", "value_opt"} and state["value_opt"]["state"], "AdamW moments saved"
    _, _, fresh = _stage(monkeypatch, "ppo")
    trained, init = stage.value_head.state_dict(), fresh.value_head.state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in trained), "the critic must have moved"
    fresh.load_state_dict(state)
    for k, v in fresh.value_head.state_dict().items():
        assert torch.equal(v, trained[k]), k
    a, b = stage.value_opt.state_dict(), fresh.value_opt.state_dict()
    for pid, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][k])), (pid, k)
    # grpo-multiturn has no critic; a ppo resume from a checkpoint without one is refused.
    _, _, gm = _stage(monkeypatch, "grpo-multiturn")
    assert gm.state_dict() == {}
    with pytest.raises(ValueError, match="no value head"):
        fresh.load_state_dict({})
