"""GRPO/SFT math of the loop on hand-computed fixtures: reward, advantages, group dropping,
loss normalization by the global token count, and micro-batch composition (2 micro-batches == 1)."""

import math

import pytest
import torch

from singleturn.model import LlamaConfig, Transformer
from singleturn.trainer.data import Example, batch_indices, pack_completions, rank_slice
from singleturn.trainer.policy_loss import (
    MicroBatch,
    PolicyBatch,
    Sequence,
    grpo_forward_backward,
    select_sequences,
)
from singleturn.trainer.reward import expert_match_rewards, zero_variance_groups
from singleturn.trainer.stages.sft import sft_forward_backward

ADM = ["go to desk 1", "take mug 1 from desk 1", "look"]


def _state(expert="go to desk 1"):
    return {"admissible": ADM, "expert_action": expert, "observation": "o", "goal": "g"}


def test_expert_match_reward_on_a_fixture():
    states = [_state("go to desk 1"), _state("take mug 1 from desk 1")]
    responses = [
        "go to desk 1",  # exact
        "  GO  to Desk 1. ",  # normalized case/space/punctuation
        "I should move. Action: look",  # admissible but not the expert's
        "fly away",  # unparseable
        "take mug 1 from desk 1",
        "Action: take mug 1 from desk 1",
        "",  # unparseable
        "go to desk 1",
    ]
    out = expert_match_rewards(responses, states, group_size=4)
    assert out.rewards.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert out.unparseable == 2
    assert out.actions[2] == "look" and out.actions[3] is None
    with pytest.raises(ValueError, match="responses for 2 states"):
        expert_match_rewards(responses[:7], states, group_size=4)


def test_zero_variance_groups_and_advantages_by_hand():
    # Groups (G=4): [1,1,1,1] all right, [0,0,0,0] all wrong, [1,0,0,0], [1,1,0,0].
    r = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0], dtype=torch.float32)
    assert zero_variance_groups(r, 4).tolist() == [True, True, False, False]
    prompts = [[1], [2], [3], [4]]
    responses = [[5, 6]] * 16
    logps = [torch.zeros(2)] * 16
    batch = select_sequences(prompts, responses, logps, r, 4, adv_scale="std")
    assert batch.zero_var_groups == 2
    assert len(batch.sequences) == 8  # groups 3 and 4 kept
    assert [s.prompt for s in batch.sequences] == [[3]] * 4 + [[4]] * 4
    # [1,0,0,0]: mean 1/4, unbiased std sqrt((9/16 + 3/16)/3) = 1/2 -> A = (3/2, -1/2, -1/2, -1/2).
    # [1,1,0,0]: mean 1/2, unbiased std sqrt(1/3)            -> A = +-(1/2)*sqrt(3).
    want = [1.5, -0.5, -0.5, -0.5] + [0.5 * math.sqrt(3)] * 2 + [-0.5 * math.sqrt(3)] * 2
    got = [s.advantage for s in batch.sequences]
    assert got == pytest.approx(want, abs=1e-5)
    none = select_sequences(prompts, responses, logps, r, 4, adv_scale="none")
    assert [s.advantage for s in none.sequences] == pytest.approx(
        [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    )
    # keep_zero_variance (TRL's work, for bench_vs_trl): all 16 sequences, the dropped ones at A = 0.
    every = select_sequences(prompts, responses, logps, r, 4, adv_scale="std", keep_zero_variance=True)
    assert [s.prompt for s in every.sequences] == [[g] for g in range(1, 5) for _ in range(4)]
    assert [s.advantage for s in every.sequences] == pytest.approx([0.0] * 8 + want, abs=1e-5)
    assert every.zero_var_groups == 2


def test_dynamic_sampling_keeps_the_first_groups_with_variance():
    # Pool of 5 groups (G=2): zero, var, zero, var, var; max_groups=2 keeps groups 1 and 3 only.
    r = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1, 1, 0], dtype=torch.float32)
    prompts = [[g] for g in range(5)]
    batch = select_sequences(prompts, [[7]] * 10, [torch.zeros(1)] * 10, r, 2, max_groups=2)
    assert [s.prompt for s in batch.sequences] == [[1], [1], [3], [3]]
    assert batch.zero_var_groups == 2  # the surplus group with variance is not a zero-variance group
    a = 1 / math.sqrt(2)  # [1,0] and [0,1]: mean 1/2, unbiased std 1/sqrt(2) (+ the kernel's eps)
    assert [s.advantage for s in batch.sequences] == pytest.approx([a, -a, -a, a], abs=1e-5)
    # Fewer informative groups than max_groups: all of them, as without the cap.
    capped = select_sequences(prompts, [[7]] * 10, [torch.zeros(1)] * 10, r, 2, max_groups=9)
    plain = select_sequences(prompts, [[7]] * 10, [torch.zeros(1)] * 10, r, 2)
    assert (
        [s.prompt for s in capped.sequences]
        == [s.prompt for s in plain.sequences]
        == [[1], [1], [3], [3], [4], [4]]
    )


def test_all_groups_zero_variance_keeps_nothing_but_a_dummy():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    batch = select_sequences([[1], [2]], [[3], [4], [5], [6]], [torch.zeros(1)] * 4, r, 2)
    assert batch.sequences == [] and batch.zero_var_groups == 2
    assert batch.dummy.advantage == 0.0 and batch.dummy.response == [3]


def test_pack_completions_positions():
    p = pack_completions([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], pad_id=0)
    assert p.tokens.tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    # The hidden state at (row, col) predicts the token at col + 1.
    assert p.rows.tolist() == [0, 0, 1, 1, 1]
    assert p.cols.tolist() == [2, 3, 0, 1, 2]
    assert p.targets.tolist() == [7, 8, 9, 10, 11]
    assert all(p.tokens[r, c + 1] == t for r, c, t in zip(p.rows, p.cols, p.targets))


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch():
    n, B = 10, 4
    first_epoch = [i for s in range(0, 2) for i in batch_indices(s, B, n, seed=3)] + batch_indices(
        2, B, n, 3
    )[:2]
    assert sorted(first_epoch) == list(range(n))
    assert batch_indices(7, B, n, 3) == batch_indices(7, B, n, 3)
    assert batch_indices(0, B, n, 3) != batch_indices(0, B, n, 4)
    assert rank_slice([0, 1, 2, 3], 1, 2) == [2, 3]


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=37, ffn_dim=48, max_seq_len=64)
    m = Transformer(cfg)
    m.init_weights(seed)
    return m


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _padded(seqs, weight=1.0):
    """A micro-batch of right-padded rows (the reference layout)."""
    packed = pack_completions([s.prompt for s in seqs], [s.response for s in seqs])
    return MicroBatch(seqs, weight, packed)


def _sequences(m, gen, n=5):
    """n sequences with random prompts/responses; old_logp = the current policy's (ratio exactly 1)."""
    from singleturn.kernels.token_logprobs import token_logprobs

    seqs = []
    for i in range(n):
        prompt = torch.randint(
            1, 37, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen
        ).tolist()
        resp = torch.randint(1, 37, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
        with torch.no_grad():
            pk = pack_completions([prompt], [resp], pad_id=0)
            old = token_logprobs(m.hidden(pk.tokens)[pk.rows, pk.cols], m.output.weight, pk.targets)
        seqs.append(Sequence(prompt, resp, old.clone(), advantage=float(i) - 1.7))
    return seqs


def test_grpo_loss_value_by_hand_and_token_normalization():
    m = _tiny_model()
    gen = torch.Generator().manual_seed(0)
    seqs = _sequences(m, gen)
    n_tok = sum(len(s.response) for s in seqs)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, temperature=1.0, device="cpu")
    stats = grpo_forward_backward(m, lambda: m.output.weight, [_padded(seqs)], global_tokens=n_tok, **kw)
    # ratio == 1 on every token: loss = -sum_s A_s * len_s / N, nothing clipped.
    want = -sum(s.advantage * len(s.response) for s in seqs) / n_tok
    assert stats["loss"] == pytest.approx(want, abs=1e-6)
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["clip_frac"] == 0.0 and stats["nonfinite"] == 0
    one = _grads(m)
    m.zero_grad(set_to_none=True)
    # The same sequences in 2 micro-batches (+ a zero-weight dummy) give the same loss and gradients.
    mbs = [_padded(seqs[:2]), _padded(seqs[2:]), _padded([seqs[0]], 0.0)]
    stats2 = grpo_forward_backward(m, lambda: m.output.weight, mbs, global_tokens=n_tok, **kw)
    assert stats2["loss"] == pytest.approx(stats["loss"], abs=1e-6)
    two = _grads(m)
    assert one.keys() == two.keys()
    for k in one:
        err = (one[k] - two[k]).abs().max().item()
        assert err <= 1e-6 * max(1.0, one[k].abs().max().item()), f"{k}: max abs diff {err:.3g}"


def test_grpo_gradient_matches_hand_derivation():
    """d loss / d logp_i = -A_i / N at ratio 1 (unclipped): compare with autograd of that surrogate."""
    from singleturn.kernels.token_logprobs import token_logprobs

    m = _tiny_model(1)
    gen = torch.Generator().manual_seed(1)
    seqs = _sequences(m, gen, n=3)
    n_tok = sum(len(s.response) for s in seqs)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, temperature=1.0, device="cpu")
    grpo_forward_backward(m, lambda: m.output.weight, [_padded(seqs)], global_tokens=n_tok, **kw)
    got = _grads(m)
    m.zero_grad(set_to_none=True)
    pk = pack_completions([s.prompt for s in seqs], [s.response for s in seqs], pad_id=0)
    logp = token_logprobs(m.hidden(pk.tokens)[pk.rows, pk.cols], m.output.weight, pk.targets)
    adv = torch.tensor([s.advantage for s in seqs])[pk.seq]
    (-(adv * logp).sum() / n_tok).backward()
    want = _grads(m)
    for k in want:
        err = (got[k] - want[k]).abs().max().item()
        assert err <= 1e-6 * max(1.0, want[k].abs().max().item()), f"{k}: max abs diff {err:.3g}"


def test_sft_micro_batches_compose_and_loss_is_mean_token_nll():
    m = _tiny_model(2)
    gen = torch.Generator().manual_seed(2)
    exs = []
    for _ in range(5):
        p = torch.randint(1, 37, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen).tolist()
        t = torch.randint(1, 37, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
        exs.append(Example(p, t, {}))
    head = lambda: m.output.weight  # noqa: E731
    s1 = sft_forward_backward(m, head, exs, micro_batch_size=5, device="cpu")
    g1 = _grads(m)
    m.zero_grad(set_to_none=True)
    s2 = sft_forward_backward(m, head, exs, micro_batch_size=2, device="cpu")
    g2 = _grads(m)
    assert s1["num_tokens"] == s2["num_tokens"] == sum(len(e.target_ids) for e in exs)
    assert s2["loss"] == pytest.approx(s1["loss"], abs=1e-6)
    for k in g1:
        err = (g1[k] - g2[k]).abs().max().item()
        assert err <= 1e-6 * max(1.0, g1[k].abs().max().item()), f"{k}: max abs diff {err:.3g}"
    # Reference: mean NLL over the target tokens from full logits.
    with torch.no_grad():
        nll, n = 0.0, 0
        for e in exs:
            ids = torch.tensor([e.prompt_ids + e.target_ids])
            logits = m(ids)[0].double().log_softmax(-1)
            for j, t in enumerate(e.target_ids):
                nll -= logits[len(e.prompt_ids) - 1 + j, t].item()
                n += 1
    assert s1["loss"] == pytest.approx(nll / n, abs=1e-5)


def test_dummy_microbatch_adds_exactly_zero_gradient():
    m = _tiny_model(3)
    seqs = _sequences(m, torch.Generator().manual_seed(3), n=2)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, temperature=1.0, device="cpu")
    stats = grpo_forward_backward(m, lambda: m.output.weight, [_padded(seqs, 0.0)], global_tokens=3.0, **kw)
    assert stats["loss"] == 0.0
    for n, p in m.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, n
    assert isinstance(PolicyBatch([], seqs[0], 0).dummy, Sequence)


def test_grpo_rollout_decodes_within_rollout_max_cache_mb(monkeypatch):
    """GRPOStage._sample hands rollout.max_cache_mb to generate: 2 states x G 8 at 100 ids need 1.6 MiB
    of KV cache on this model, so a 1 MiB bound decodes them one state at a time; 0 in one batch."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from singleturn.model.generate import kv_cache_bytes
    from singleturn.trainer.config import TrainConfig
    from singleturn.trainer.stages.grpo import GRPOStage

    torch.manual_seed(0)
    model = Transformer(
        LlamaConfig(vocab_size=300, dim=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=128, max_seq_len=256)
    )
    tok = SimpleNamespace(pad_id=0, eos_id=1, decode=lambda ids: " ".join(map(str, ids)))
    monkeypatch.setattr("singleturn.model.policy.stop_ids", lambda tokenizer: (1,))
    local = [SimpleNamespace(prompt_ids=torch.randint(2, 300, (100,)).tolist()) for _ in range(2)]
    sizes = []
    real = model.setup_caches
    monkeypatch.setattr(
        model, "setup_caches", lambda rows, n, **kw: (sizes.append((rows, n)), real(rows, n, **kw))[1]
    )
    out = {}
    for mb in (0, 1):
        cfg = TrainConfig()
        cfg.rollout.max_cache_mb, cfg.rollout.dtype, cfg.rollout.max_new_tokens = mb, "float32", 8
        ctx = SimpleNamespace(
            cfg=cfg, model=model, tokenizer=tok, info=SimpleNamespace(rank=0),
            fsdp=SimpleNamespace(summon_full_params=lambda dtype: nullcontext()),
        )  # fmt: skip
        sizes.clear()
        stage = SimpleNamespace(span=SimpleNamespace(first=0))
        out[mb], chunks = GRPOStage._sample(stage, ctx, 0, local)
        assert len(out[mb]) == 16
        if mb == 0:
            assert sizes == [(16, 108)] and chunks == 1
        else:
            assert sizes == [(8, 108), (8, 108)] and kv_cache_bytes(model, 8, 108) <= 1 << 20
            assert chunks == 2  # counted: the metrics row's rollout_chunks
    # The first state's draws are the same either way (chunk 0 is the unchunked call's stream).
    assert [c.tokens for c in out[0][:8]] == [c.tokens for c in out[1][:8]]
