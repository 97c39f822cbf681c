"""Admissible-constrained decoding: the action trie; the act path's decodings on window prompts
(`model.EpisodePolicy(prompt="window")`: trie-constrained greedy is the greedy best admissible command,
ranking the most probable one, free greedy what `generate` decodes); the one prompt-length rule; and
harness.evaluate passing admissible lists to text policies that want them."""

import pytest
import torch

from singleturn.model.constrained import ActionTrie, action_trie, allowed_tokens_fn

ACTIONS = [
    "go to countertop 1",
    "go to countertop 2",
    "go to cabinet 1",
    "take cloth 1 from sinkbasin 1",
    "open cabinet 1",
    "look",
    "inventory",
]


@pytest.fixture(scope="module")
def tok():
    from singleturn.model import train_tokenizer

    return train_tokenizer(ACTIONS + ["Your task is to put a clean cloth in countertop."], 300)


STATES = [  # two eval states: the full action list, and a two-command one
    {"goal": "put a clean cloth in countertop", "observation": "You see a cloth 1.", "admissible": ACTIONS},
    {"goal": "look", "observation": "Nothing.", "admissible": ACTIONS[4:6]},
]


def _tiny_model(vocab: int, seed: int = 0):
    from singleturn.model import LlamaConfig, Transformer

    cfg = LlamaConfig(
        dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_dim=64, max_seq_len=512
    )
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    return model.eval()


def test_action_trie_prefixes():
    trie = ActionTrie([[1, 2, 9], [1, 3, 9], [4, 9]])
    assert sorted(trie.allowed([])) == [1, 4]
    assert sorted(trie.allowed([1])) == [2, 3]
    assert trie.allowed([1, 2]) == [9] and trie.allowed([4, 9]) == [] and trie.allowed([5]) == []
    assert trie.max_len == 3
    hook = allowed_tokens_fn([trie, ActionTrie([[7, 9]])], num_samples=2)
    assert sorted(hook(1, [])) == [1, 4] and hook(2, []) == [7] and hook(3, [7]) == [9]
    with pytest.raises(ValueError):
        ActionTrie([[1], []])


def test_action_trie_is_the_sft_target_format(tok):
    trie = action_trie(tok, ACTIONS)
    for a in ACTIONS:  # walking a command's SFT target stays on the trie and ends after eot
        target = tok.encode(a) + [tok.eot_id]
        for j, t in enumerate(target):
            assert t in trie.allowed(target[:j]), (a, j)
        assert trie.allowed(target) == []


def _window_policy(model, tok, **kw):
    from singleturn.model.episode_policy import EpisodePolicy

    return EpisodePolicy(model, tok, prompt="window", history_window=1, system_prompt=True, max_len=512, **kw)


def _states():
    return [{"game": f"g{i}", "step": 0, "history": [], **s} for i, s in enumerate(STATES)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constrained_policy_outputs_the_best_admissible_action(tok, seed):
    from singleturn.harness import render_prompt

    torch.manual_seed(seed)
    model = _tiny_model(tok.vocab_size, seed=seed)
    states = _states()
    pol = _window_policy(model, tok, decoding="greedy", constrained=True, max_new_tokens=3)
    texts = pol.act_states(states)
    for s, text in zip(states, texts):
        assert text in s["admissible"]  # longer than max_new_tokens=3 is still whole
        # Greedy over the trie: at each token, the best-scoring id among those the trie allows.
        trie = action_trie(tok, s["admissible"])
        prompt = tok.apply_chat_template(render_prompt(s, 1), add_generation_prompt=True)
        resp = tok.encode(text) + [tok.eot_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + resp]))[0, len(prompt) - 1 :]  # (len(resp)+1, V)
        for j, t in enumerate(resp):
            ids = trie.allowed(resp[:j])
            assert t == ids[int(logits[j, ids].argmax())], (text, j)
    pol.close()


@pytest.mark.parametrize("seed", [0, 1])
def test_free_greedy_decodes_what_generate_decodes(tok, seed):
    """constrained=False: free greedy, at most max_new_tokens, the ids `generate` picks at temperature 0."""
    from singleturn.harness import render_prompt
    from singleturn.model.policy import sample_completions

    model = _tiny_model(tok.vocab_size, seed=seed)
    states = _states()
    pol = _window_policy(model, tok, decoding="greedy", constrained=False, max_new_tokens=3)
    texts = pol.act_states(states)
    prompts = [tok.apply_chat_template(render_prompt(s, 1), add_generation_prompt=True) for s in states]
    with torch.no_grad():
        want = sample_completions(
            model, tok, prompts, num_samples=1, max_new_tokens=3, temperature=0.0, seed=0
        )
    assert texts == [c.text for c in want] and [c.tokens for _, c in pol.last] == [c.tokens for c in want]
    assert all(len(c.tokens) <= 3 for _, c in pol.last)
    pol.close()


def test_evaluate_passes_admissible_to_policies_that_want_it():
    from singleturn.harness.evaluate import _policy_act
    from singleturn.harness.prompts import PromptFormat

    seen = {}

    class Wants:
        wants_admissible = True

        def __call__(self, messages, admissible=None):
            seen["admissible"] = admissible
            return [a[-1] for a in admissible]

    states = [{"goal": "g", "observation": "o", "admissible": ["look", "inventory"]}]
    act, _ = _policy_act(Wants(), PromptFormat(history_window=1), 0)
    assert act(states) == ["inventory"] and seen["admissible"] == [["look", "inventory"]]
    act, _ = _policy_act(
        lambda messages: ["look"], PromptFormat(history_window=1), 0
    )  # plain callables are called as before
    assert act(states) == ["look"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_policy_plays_the_most_probable_admissible_action(tok, seed):
    """decoding='rank': the argmax over admissible commands of the teacher-forced total log-prob."""
    from singleturn.harness import render_prompt
    from singleturn.model.episode_policy import EpisodePolicy

    model = _tiny_model(tok.vocab_size, seed=seed)
    states = _states()
    pol = _window_policy(model, tok, decoding="rank")
    got = pol.act_states(states)
    for s, action in zip(states, got):
        prompt = tok.apply_chat_template(render_prompt(s, 1), add_generation_prompt=True)
        totals = []
        for a in s["admissible"]:
            resp = tok.encode(a) + [tok.eot_id]
            with torch.no_grad():
                logp = model(torch.tensor([prompt + resp]))[0].double().log_softmax(-1)
            totals.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(resp)))
        assert action == s["admissible"][max(range(len(totals)), key=totals.__getitem__)]
    pol.close()
    with pytest.raises(ValueError, match="decodes by"):
        EpisodePolicy(model, tok, decoding="beam")
    with pytest.raises(ValueError, match="prompt must be"):
        EpisodePolicy(model, tok, prompt="novel")


def test_one_prompt_length_rule():
    from singleturn.model.policy import prompt_budget, response_room

    class Tok:
        def encode(self, text):
            return list(range(len(text.split())))

    assert prompt_budget(1024, 10) == 1014
    for bad in (0, 1024, 2000):
        with pytest.raises(ValueError, match="no room"):
            prompt_budget(1024, bad)
    adm = ["look", "go to cabinet 1", "take apple 1 from table 2"]
    # ranked and constrained decoding emit an admissible command + end of turn; free greedy max_new_tokens
    assert (
        response_room(Tok(), adm, decoding="rank", constrained=False, max_new_tokens=24) == 7
    )  # 6 words + end of turn
    assert (
        response_room(Tok(), adm, decoding="greedy", constrained=True, max_new_tokens=24) == 7
    )  # 6 words + end of turn
    assert response_room(Tok(), adm, decoding="greedy", constrained=False, max_new_tokens=24) == 24
