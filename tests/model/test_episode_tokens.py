"""An append-only conversation (harness.render_episode) split per turn (model.episode_tokens): the
committed ids only grow, committed + this turn's ids are the whole chat template's ids, and the ids a
turn commits are [the previous turn's template tail without its suffix | the action as scored | ...],
so what EpisodeCache scored is what it keeps. Checked for a LLaMA-3-format tokenizer trained here and
for SmolLM2's ChatML template."""

import pytest

from singleturn.harness.prompts import render_episode
from singleturn.model import train_tokenizer
from singleturn.model.episode_tokens import TurnSplitError, extend_committed, split_turn
from singleturn.model.tokenizer import Tokenizer
from tests.model.test_chat_template import CORPUS, chatml_dir

OBS = [
    "-= Welcome to TextWorld, ALFRED! =- You are in the middle of a room. Looking quickly around you, "
    "you see a cabinet 1, a countertop 1, and a fridge 1. Your task is to: put a clean apple in fridge.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 1.",
    "You pick up the apple 1 from the countertop 1.",
    "You arrive at fridge 1. The fridge 1 is closed.",
]
ACTIONS = ["go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1"]
ADMISSIBLE = ["go to cabinet 1", "go to countertop 1", "go to fridge 1", "look", "inventory"]


def _states():
    for t in range(len(OBS)):
        yield {
            "goal": "put a clean apple in fridge",
            "history": [[OBS[i], ACTIONS[i]] for i in range(t)],
            "observation": OBS[t],
            "admissible": ADMISSIBLE,
        }


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def tok(request, tmp_path_factory):
    if request.param == "llama3":
        return train_tokenizer(CORPUS + OBS + ACTIONS + ADMISSIBLE, vocab_size=500)
    return Tokenizer.from_file(str(chatml_dir(tmp_path_factory.mktemp("tok")) / "tokenizer.json"))


@pytest.mark.parametrize("list_admissible", [True, False])
def test_turns_split_grow_and_commit_what_was_scored(tok, list_admissible):
    previous = prev_messages = None
    for t, state in enumerate(_states()):
        messages, suffix = render_episode(state, list_admissible=list_admissible)
        assert messages[-1]["role"] == "user" and ("Admissible actions" in suffix) == list_admissible
        committed, turn = split_turn(tok, messages, suffix)
        whole = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + suffix}]
        assert committed + turn == tok.apply_chat_template(whole)
        if previous is not None:
            new = extend_committed(previous, committed)
            # the previous turn's template tail (its suffix dropped), then the action as scored: encode + end of turn
            _, tail = split_turn(tok, prev_messages, "")
            action = tok.encode(ACTIONS[t - 1]) + [tok.eot_id]
            assert new[: len(tail) + len(action)] == tail + action
        previous, prev_messages = committed, messages


def test_a_changed_history_is_not_append_only(tok):
    with pytest.raises(TurnSplitError, match="not append-only"):
        extend_committed([1, 2, 3], [1, 2, 4, 5])
    with pytest.raises(TurnSplitError, match="end with the current user message"):
        split_turn(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "")


def test_an_episode_through_the_cache_scores_as_the_whole_prompt(hf_pair):
    # The pieces together: per turn, append what the turn commits, score the admissible commands with
    # this turn's ids as the suffix; equal to ranking them after the whole chat template (fp32).
    from singleturn.model.episode_cache import EpisodeCache
    from singleturn.model.generate import score_continuations

    tok = train_tokenizer(CORPUS + OBS + ACTIONS + ADMISSIBLE, vocab_size=500)
    _, model = hf_pair(seed=9, n_kv_heads=2, vocab_size=1003)
    cache = EpisodeCache(model, 1, max_len=1024)
    previous: list[int] = []
    cands = [tok.encode(a) + [tok.eot_id] for a in ADMISSIBLE]
    for state in _states():
        messages, suffix = render_episode(state)
        committed, turn = split_turn(tok, messages, suffix)
        cache.append([extend_committed(previous, committed)])
        previous = committed
        got = cache.score([cands], suffix=[turn])[0]
        want = score_continuations(model, [committed + turn], [cands])[0]
        assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-5
    assert cache.lengths == [len(previous)]
