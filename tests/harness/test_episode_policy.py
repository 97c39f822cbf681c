"""EpisodePolicy (model/episode_policy.py), the one act path, through harness.evaluate on real games:
episodes played in lockstep (one batched forward per turn over all live episodes) take the same
actions, success and accuracy as the same episodes played one at a time (float64: no batched-rounding
near-ties); rows are given back as episodes end, so fewer rows than games suffice; in both prompt
formats and every decoding it picks what the cache-free reference (`per_state_policy`: each state's
whole prompt through model/generate.py) picks, window prompts cut to fit included."""

import pytest
import torch

from singleturn.harness import evaluate
from singleturn.harness.prompts import clean_observation
from singleturn.model import LlamaConfig, Transformer, train_tokenizer
from singleturn.model.episode_policy import EpisodePolicy


@pytest.fixture(scope="module")
def model_and_tok(train_games):
    import json

    texts = []
    for g in train_games:  # the games' own words, so the tokenizer covers them
        traj = (
            json.loads((g.parent / "traj_data.json").read_text())
            if (g.parent / "traj_data.json").exists()
            else {}
        )
        texts.append(json.dumps(traj)[:4000])
    texts += [
        clean_observation("You are in the middle of a room."),
        "go to cabinet 1",
        "take apple 1 from countertop 1",
    ]
    tok = train_tokenizer(texts, vocab_size=600)
    cfg = LlamaConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=tok.vocab_size,
        ffn_dim=128,
        max_seq_len=4096,
        tie_word_embeddings=True,
        bos_id=tok.bos_id,
        eos_ids=(tok.eot_id,),
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    return model.double().eval(), tok


def _play(model, tok, games, batch_size, rows, decoding="rank", list_admissible=True):
    policy = EpisodePolicy(
        model,
        tok,
        decoding=decoding,
        max_episodes=rows,
        max_len=4096,
        dtype=torch.float64,
        list_admissible=list_admissible,
    )
    report = evaluate(policy, games, max_steps=5, batch_size=batch_size, num_workers=1)
    policy.close()
    return report, policy


@pytest.mark.parametrize("decoding", ["rank", "greedy"])
def test_lockstep_equals_one_by_one(model_and_tok, train_games, decoding):
    model, tok = model_and_tok
    games = train_games[:4]
    lock, p_lock = _play(model, tok, games, batch_size=4, rows=4, decoding=decoding)
    alone, p_alone = _play(model, tok, games, batch_size=1, rows=1, decoding=decoding)  # one row, reused
    by_game = lambda r: {e["game"]: e["actions"] for e in r.episodes}  # noqa: E731
    assert by_game(lock) == by_game(alone)
    assert (lock.success_rate, lock.action_accuracy) == (alone.success_rate, alone.action_accuracy)
    assert all(a is not None for acts in by_game(lock).values() for a in acts)  # ranked: always admissible
    assert p_lock.calls < p_alone.calls  # lockstep: one call per turn for all live episodes


def test_refuses_more_live_episodes_than_rows(model_and_tok, train_games):
    model, tok = model_and_tok
    policy = EpisodePolicy(model, tok, max_episodes=1, max_len=4096, dtype=torch.float64)
    states = [
        {"game": str(g), "step": 0, "goal": "x", "history": [], "observation": "o", "admissible": ["look"]}
        for g in train_games[:2]
    ]
    with pytest.raises(ValueError, match="more than 1 live episodes"):
        policy.act_states(states)


def test_a_crashed_worker_mid_lockstep_fails_one_episode_and_the_rest_play_on(model_and_tok, train_games):
    """A worker killed in the middle of a lockstep batch: its episodes are env failures (counted), the
    worker is restarted, their cache rows are given back, and every other episode takes exactly the
    actions it takes in an undisturbed run."""
    import os
    import signal

    from singleturn.harness import EnvPool

    model, tok = model_and_tok
    games = train_games[:4]
    clean, _ = _play(model, tok, games, batch_size=4, rows=4)
    policy = EpisodePolicy(model, tok, max_episodes=4, max_len=4096, dtype=torch.float64)
    with EnvPool(games, num_workers=2) as pool:

        class KillOnThirdTurn:
            name = "kill-on-third-turn"

            def __init__(self):
                self.calls = 0

            __call__ = policy.__call__  # callable like every policy; acts through act_states

            def act_states(self, states):
                self.calls += 1
                if self.calls == 3:
                    os.kill(pool.worker_pids()[0], signal.SIGKILL)
                return policy.act_states(states)

        report = evaluate(KillOnThirdTurn(), games, max_steps=5, batch_size=4, pool=pool)
        restarts = pool.restarts
    policy.close()
    # the killed worker held two of the four episodes (two envs per worker): both fail, the other two play on
    assert report.env_failures == 2 and restarts == 1 and len(report.episodes) == 4
    want = {e["game"]: e["actions"] for e in clean.episodes}
    for e in report.episodes:
        if e["failed"]:
            assert e["actions"] == want[e["game"]][: len(e["actions"])] and e["steps"] < 5
        else:
            assert e["actions"] == want[e["game"]]
    # the failed episodes' rows were given back on the next turn (they stopped appearing); the two
    # survivors, live in the last turn, hold theirs
    assert (
        set(policy.rows) == {e["game"] for e in report.episodes if not e["failed"]} and len(policy.free) == 2
    )


def test_the_policy_spec_builds_the_episode_policy(model_and_tok):
    from singleturn.model.policy import PolicySpec

    model, tok = model_and_tok
    policy = PolicySpec(prompt="episode", decoding="rank", batch_size=3, max_len=512).policy(model, tok)
    assert isinstance(policy, EpisodePolicy) and policy.cache.rows == 3 and policy.cache.max_len == 512
    policy.close()
    spec = PolicySpec(prompt="window", decoding="greedy", history_window=2, batch_size=2, max_new_tokens=5)
    policy = spec.policy(model, tok)
    assert (policy.prompt, policy.decoding, policy.constrained, policy.history_window) == (
        "window",
        "greedy",
        False,
        2,
    )
    assert policy.sampling["max_new_tokens"] == 5 and policy.cache.max_len == model.config.max_seq_len
    policy.close()
    with pytest.raises(ValueError, match="'greedy' or 'rank'"):
        PolicySpec(decoding="sample").policy(model, tok)


def _reference(
    model, tok, games, per_state_policy, *, prompt, decoding, constrained, list_admissible, max_len=4096
):
    """The same games through the cache-free reference and through the cache; both reports, both policies."""
    free = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 4}
    sampling = None if decoding == "rank" or constrained else free
    fmt = dict(prompt=prompt, list_admissible=list_admissible, system_prompt=False, history_window=2)
    ref = per_state_policy(
        model, tok, decoding=decoding, constrained=constrained, max_len=max_len, sampling=sampling
    )
    want = evaluate(ref, games, max_steps=5, batch_size=4, num_workers=1, **fmt)
    policy = EpisodePolicy(
        model,
        tok,
        decoding=decoding,
        constrained=constrained,
        max_new_tokens=4,
        max_episodes=4,
        max_len=max_len,
        dtype=torch.float64,
        **fmt,
    )
    got = evaluate(policy, games, max_steps=5, batch_size=4, num_workers=1, **fmt)
    policy.close()
    return got, want, policy, ref


_by_game = lambda r: {e["game"]: (e["actions"], e["won"], e["invalid"]) for e in r.episodes}  # noqa: E731


@pytest.mark.parametrize(
    "prompt,decoding,constrained,list_admissible",
    [
        ("episode", "greedy", True, True),
        ("episode", "greedy", True, False),
        ("episode", "greedy", False, False),
        ("window", "rank", True, True),
        ("window", "greedy", True, True),
        ("window", "greedy", False, True),
    ],
)
def test_the_cache_plays_what_each_whole_prompt_plays(
    model_and_tok, train_games, per_state_policy, prompt, decoding, constrained, list_admissible
):
    """The same episodes, actions and outcomes as the cache-free reference decoding each state's whole
    prompt (re-encoded every turn), in float64: trie-constrained greedy, free greedy, ranking; the
    episode format with and without the per-turn list, and the window format."""
    model, tok = model_and_tok
    kw = dict(prompt=prompt, decoding=decoding, constrained=constrained, list_admissible=list_admissible)
    got, want, _, _ = _reference(model, tok, train_games[:4], per_state_policy, **kw)
    assert _by_game(got) == _by_game(want) and sum(len(a) for a, _, _ in _by_game(want).values()) >= 12
    assert got.action_accuracy == want.action_accuracy


@pytest.mark.parametrize("decoding", ["rank", "greedy"])
def test_window_prompts_that_do_not_fit_keep_their_last_ids(
    model_and_tok, train_games, per_state_policy, decoding
):
    """A window prompt longer than the context keeps its last ids (leaving room for the state's
    response), counted, as the per-state path cuts it: the same actions, the same count."""
    model, tok = model_and_tok
    kw = dict(prompt="window", decoding=decoding, constrained=True, list_admissible=True)
    got, want, policy, ref = _reference(model, tok, train_games[:4], per_state_policy, max_len=160, **kw)
    assert _by_game(got) == _by_game(want)
    assert policy.truncated == ref.truncated > 0


def test_greedy_keeps_what_the_next_turn_writes_the_same_way(model_and_tok):
    """Without a per-turn list, the assistant header and the decoded action's ids that the cache holds
    are the next turn's ids too: the next turn computes only what follows them."""
    model, tok = model_and_tok
    policy = EpisodePolicy(
        model,
        tok,
        decoding="greedy",
        max_episodes=1,
        max_len=4096,
        dtype=torch.float64,
        list_admissible=False,
    )
    admissible = ["go to cabinet 1", "go to countertop 1", "take apple 1 from countertop 1", "look"]
    s0 = {
        "game": "g",
        "step": 0,
        "goal": "put an apple in the cabinet",
        "history": [],
        "observation": "You are in the middle of a room.",
        "admissible": admissible,
    }
    (a0,) = policy.act_states([s0])
    held = list(policy.held[0])
    committed0 = list(policy.committed[0])
    assert held[: len(committed0)] == committed0 and len(held) > len(committed0)  # the header (+ picks) stay
    s1 = {**s0, "step": 1, "history": [(s0["observation"], a0)], "observation": "You see nothing."}
    before = policy.cache.computed_tokens
    policy.act_states([s1])
    committed1 = policy.committed[0]
    assert committed1[: len(held)] == held  # the next turn's stream writes them the same way
    appended = policy.cache.computed_tokens - before
    decoded = policy.held[0][len(committed1) :]
    assert appended == len(committed1) - len(held) + len(decoded)
    policy.close()


def test_teacher_forced_actions_equal_ranking_each_whole_prompt(model_and_tok, train_games, tmp_path):
    """trainer.bound's teacher-forced agreement in the episode format: lockstep over the expert
    trajectories (cached) picks what ranking each state's whole per-state prompt picks (float64);
    its expert-action log-probs over one token tree per episode equal each whole per-state prompt's."""
    import copy
    from types import SimpleNamespace

    from singleturn.harness import collect_states, read_states
    from singleturn.model.generate import score_continuations
    from singleturn.trainer.bound import (
        _episode_logprobs,
        _episode_prompts,
        _expert_episodes,
        _sequence_logprobs,
    )
    from singleturn.trainer.holdout import teacher_forced_actions

    model, tok = model_and_tok
    games = train_games[:3]
    collect_states(games, tmp_path / "states.jsonl")
    states = read_states(tmp_path / "states.jsonl")
    traj: dict[str, list[dict]] = {}
    for s in states:
        traj.setdefault(s["game"], []).append(s)
    ordered = [s for g in traj for s in traj[g]]
    cfg = SimpleNamespace(data=SimpleNamespace(list_admissible=True, system_prompt=False))
    prompts = _episode_prompts(ordered, tok, cfg, 4096)
    policy = EpisodePolicy(model, tok, max_episodes=2, max_len=4096, dtype=torch.float64)
    got = teacher_forced_actions(policy, traj, batch_size=2)
    policy.close()
    want = []
    for p, s in zip(prompts, ordered):
        cands = [tok.encode(a) + [tok.eot_id] for a in s["admissible"]]
        scores = score_continuations(model, [p], [cands])[0]
        want.append(s["admissible"][max(range(len(cands)), key=scores.__getitem__)])
    assert got == want and len(got) == len(ordered) > 6
    m32 = copy.deepcopy(model).float()  # the fused log-prob head takes fp32 / bf16
    for keep in (True, False):  # with the list: a branch per state; without: the targets on the trunk
        cfg.data.list_admissible = keep
        targets = [tok.encode(s["expert_action"]) + [tok.eot_id] for s in ordered]
        per_state = _sequence_logprobs(m32, _episode_prompts(ordered, tok, cfg, 4096), targets, "cpu")
        trees = _episode_logprobs(m32, _expert_episodes(ordered, tok, cfg, 4096), "cpu", max_tokens=700)
        assert len(trees) == len(per_state) and all(x < 0 for x in trees)
        assert torch.allclose(torch.tensor(trees), torch.tensor(per_state), rtol=1e-5, atol=1e-5), keep


def test_sampled_rollouts_over_the_cache_equal_sampling_each_whole_prompt(model_and_tok, train_games):
    """decoding='sample' (the multi-turn rollouts): on real games in lockstep, each turn's recorded
    prompt ids are the whole episode prompt as the per-state path encodes it, and the sampled ids and
    log-probs are what `sample_completions` draws for the call's whole prompts with the call's seed
    (float64). The responses of an untrained model rarely name a command, so the next turns also
    check that a response the history writes differently is dropped from the row, not kept."""
    from singleturn.harness import parse_action
    from singleturn.harness.prompts import render_episode
    from singleturn.harness.rollout import run_episodes
    from singleturn.model.policy import sample_completions

    model, tok = model_and_tok
    knobs = dict(temperature=0.9, top_p=0.95, top_k=0, max_new_tokens=6)
    policy = EpisodePolicy(
        model,
        tok,
        decoding="sample",
        max_episodes=3,
        max_len=4096,
        dtype=torch.float64,
        list_admissible=True,
        sampling=knobs,
        seed=5,
    )
    calls = []

    def act(states):
        texts = policy.act_states(states)
        calls.append(([dict(s) for s in states], list(policy.last)))
        return [parse_action(t, s["admissible"]) for t, s in zip(texts, states)]

    run_episodes(train_games[:3], act, max_steps=4, batch_size=3, num_workers=1)
    policy.close()
    assert len(calls) >= 3 and sum(len(st) for st, _ in calls) >= 9
    for c, (states, last) in enumerate(calls):
        whole = []
        for s in states:
            messages, suffix = render_episode(s, list_admissible=True, system_prompt=False)
            messages[-1] = {**messages[-1], "content": messages[-1]["content"] + suffix}
            whole.append(tok.apply_chat_template(messages, add_generation_prompt=True))
        assert [p for p, _ in last] == whole, c
        ref = sample_completions(
            model,
            tok,
            whole,
            num_samples=1,
            max_new_tokens=6,
            temperature=0.9,
            top_p=0.95,
            seed=(5 + 7919 * c) & 0x7FFF_FFFF,
        )
        for (_, got), want in zip(last, ref):
            assert got.tokens == want.tokens and got.text == want.text, c
            torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="takes `sampling`"):
        EpisodePolicy(model, tok, decoding="sample")
