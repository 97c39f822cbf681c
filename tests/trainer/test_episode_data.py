"""Whole-episode SFT (trainer.episode_data): one token tree per expert episode equals the per-state path.

fp32, CPU, a random model. For a LLaMA-3-format tokenizer and SmolLM2's ChatML template, with the
admissible list as a per-turn branch and without it: the per-state prompts are the chat template's ids
of the episode conversation; the tree's SFT loss, per-state action probabilities and every parameter
gradient equal those of each state trained as its own prompt (1e-5 relative), over several episodes
split into several micro-batches; without the list nothing is repeated (no branch at all).
"""

import pytest

from singleturn.harness.prompts import PromptFormat, render_episode
from singleturn.model import train_tokenizer
from singleturn.model.tokenizer import Tokenizer
from singleturn.trainer.episode_data import build_episode_examples, episode_states
from singleturn.trainer.stages.sft import sft_forward_backward
from tests.model.test_chat_template import CORPUS, chatml_dir
from tests.model.test_episode_tokens import ACTIONS, ADMISSIBLE, OBS

ACTIONS_ALL = ACTIONS + ["move apple 1 to fridge 1"]


def _episode(game: str, n: int) -> list[dict]:
    return [
        {
            "game": game,
            "step": t,
            "goal": "put a clean apple in fridge",
            "task_type": "pick_and_place_simple",
            "history": [[OBS[i], ACTIONS_ALL[i]] for i in range(t)],
            "observation": OBS[t],
            "admissible": ADMISSIBLE + [ACTIONS_ALL[t]],
            "expert_action": ACTIONS_ALL[t],
        }
        for t in range(n)
    ]


def _states() -> list[dict]:
    # Interleaved on purpose: episodes are regrouped by game, in step order.
    a, b, c = _episode("g/a", 4), _episode("g/b", 2), _episode("g/c", 3)
    return [a[0], b[1], a[1], c[0], a[2], b[0], c[1], a[3], c[2]]


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def tok(request, tmp_path_factory):
    if request.param == "llama3":
        return train_tokenizer(CORPUS + OBS + ACTIONS_ALL + ADMISSIBLE, vocab_size=500)
    return Tokenizer.from_file(str(chatml_dir(tmp_path_factory.mktemp("tok")) / "tokenizer.json"))


def _model(vocab: int):
    from singleturn.model import LlamaConfig, Transformer

    cfg = LlamaConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_dim=64, max_seq_len=2048
    )
    m = Transformer(cfg)
    m.init_weights(seed=3)
    return m


def _sft(model, examples, **kw):
    model.zero_grad(set_to_none=True)
    stats = sft_forward_backward(model, lambda: model.output.weight, examples, device="cpu", **kw)
    return stats, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("list_admissible", [True, False])
def test_episode_tree_equals_per_state_sft(tok, list_admissible):
    states = _states()
    episodes, examples, dropped = build_episode_examples(
        states, tok, list_admissible=list_admissible, system_prompt=False, max_seq_len=2048
    )
    assert dropped == 0 and [len(e.states) for e in episodes] == [4, 2, 3]
    # per-state prompts: the chat template of the conversation with this turn's suffix, + the generation prompt
    fmt = PromptFormat(
        "episode", system_prompt=False, list_admissible=list_admissible
    )  # what rollouts render
    for e in examples:
        messages, suffix = render_episode(e.state, list_admissible=list_admissible)
        whole = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + suffix}]
        assert fmt.messages(e.state) == whole
        assert e.prompt_ids == tok.apply_chat_template(whole, add_generation_prompt=True)
        assert e.target_ids == tok.encode(e.state["expert_action"]) + [tok.eot_id]
    per_state_tokens = sum(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    tree_tokens = sum(ep.num_tokens for ep in episodes)
    assert tree_tokens < per_state_tokens
    if (
        not list_admissible
    ):  # the scored turn is the trunk's continuation: one linear sequence, nothing repeated
        assert all(set(ep.item.branch) == {0} for ep in episodes)
        last = [e for e in examples if e.state is episodes[0].states[-1]][0]
        assert episodes[0].item.tokens == last.prompt_ids + last.target_ids
    else:
        # a branch per turn but the last (nothing follows it on the trunk)
        assert all(sorted(set(ep.item.branch)) == list(range(len(ep.states))) for ep in episodes)

    model = _model(max(tok.vocab_size, max(max(ep.item.tokens) for ep in episodes) + 1))
    # the per-state path, in the episodes' state order (so per-state statistics line up)
    ordered = [e for ep in episodes for s in ep.states for e in examples if e.state is s]
    ref, ref_g = _sft(model, ordered, micro_batch_size=3)
    for max_tokens in (4096, 300):  # one micro-batch; several (an episode per row)
        got, got_g = _sft(model, episodes, max_tokens=max_tokens)
        assert got["num_tokens"] == ref["num_tokens"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["action_prob"] == pytest.approx(ref["action_prob"], rel=1e-5)
        for n, g in ref_g.items():
            err = (got_g[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)
            assert err < 1e-5, (n, float(err))


def test_long_episodes_are_dropped_whole_and_counted(tok):
    states = _states()
    full, _, _ = build_episode_examples(
        states, tok, list_admissible=True, system_prompt=False, max_seq_len=4096
    )
    need = {ep.states[0]["game"]: max(p + 1 for p in ep.item.positions) for ep in full}
    cut = sorted(need.values())[1]  # the shortest two fit, the longest does not
    episodes, examples, dropped = build_episode_examples(
        states, tok, list_admissible=True, system_prompt=False, max_seq_len=cut
    )
    assert len(episodes) == 2 and dropped == 4 and len(examples) == len(states) - 4
    assert all(max(p + 1 for p in ep.item.positions) <= cut for ep in episodes)


def test_an_episode_with_a_missing_step_is_refused():
    states = [s for s in _episode("g/a", 4) if s["step"] != 2]
    with pytest.raises(ValueError, match="steps 0..2"):
        episode_states(states)


def test_batches_drawn_episode_by_episode():
    """batch_indices(blocks=): each epoch visits every state once, whole episodes in a seeded order,
    each episode's states together and in step order; a pure function of the step."""
    from singleturn.trainer.data import batch_indices

    blocks = (4, 2, 3, 5)
    starts = [0, 4, 6, 9]
    n = sum(blocks)
    for epoch in range(3):
        stream = [
            i
            for step in range(epoch * n // 2, (epoch + 1) * n // 2)
            for i in batch_indices(step, 2, n, 7, blocks)
        ]
        assert sorted(stream) == list(range(n))
        runs, k = [], 0
        while k < n:
            b = starts.index(stream[k])
            assert stream[k : k + blocks[b]] == list(range(starts[b], starts[b] + blocks[b]))
            runs.append(b)
            k += blocks[b]
        assert sorted(runs) == [0, 1, 2, 3]
    assert batch_indices(5, 3, n, 7, blocks) == batch_indices(5, 3, n, 7, blocks)
    orders = {tuple(batch_indices(0, n, n, s, blocks)) for s in range(6)}
    assert len(orders) > 1  # the seed shuffles the episodes
