"""EpisodeRankPolicy (model/episode_policy.py) through harness.evaluate on real games: episodes played in
lockstep (one batched forward per turn over all live episodes) take the same actions, success and
accuracy as the same episodes played one at a time (float64: no batched-rounding near-ties); rows are
given back as episodes end, so fewer rows than games suffice."""

import pytest
import torch

from singleturn.harness import evaluate
from singleturn.harness.prompts import clean_observation
from singleturn.model import LlamaConfig, Transformer, train_tokenizer
from singleturn.model.episode_policy import EpisodeRankPolicy


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
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, ffn_dim=128,
                      max_seq_len=4096, tie_word_embeddings=True, bos_id=tok.bos_id, eos_ids=(tok.eot_id,))  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    return model.double().eval(), tok


def _play(model, tok, games, batch_size, rows):
    policy = EpisodeRankPolicy(model, tok, max_episodes=rows, max_len=4096, dtype=torch.float64)
    report = evaluate(policy, games, max_steps=5, batch_size=batch_size, num_workers=1)
    policy.close()
    return report, policy


def test_lockstep_equals_one_by_one(model_and_tok, train_games):
    model, tok = model_and_tok
    games = train_games[:4]
    lock, p_lock = _play(model, tok, games, batch_size=4, rows=4)
    alone, p_alone = _play(model, tok, games, batch_size=1, rows=1)  # one row, reused by every episode
    by_game = lambda r: {e["game"]: e["actions"] for e in r.episodes}  # noqa: E731
    assert by_game(lock) == by_game(alone)
    assert (lock.success_rate, lock.action_accuracy) == (alone.success_rate, alone.action_accuracy)
    assert all(a is not None for acts in by_game(lock).values() for a in acts)  # ranked: always admissible
    assert p_lock.calls < p_alone.calls  # lockstep: one call per turn for all live episodes


def test_refuses_more_live_episodes_than_rows(model_and_tok, train_games):
    model, tok = model_and_tok
    policy = EpisodeRankPolicy(model, tok, max_episodes=1, max_len=4096, dtype=torch.float64)
    states = [{"game": str(g), "step": 0, "goal": "x", "history": [], "observation": "o", "admissible": ["look"]}
              for g in train_games[:2]]  # fmt: skip
    with pytest.raises(ValueError, match="more than 1 live episodes"):
        policy.act_states(states)
