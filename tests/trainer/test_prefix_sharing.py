"""Train each prompt once: the shared-prefix policy update and packed SFT equal the padded reference.

fp32, CPU. GRPO: ragged prompts and responses, odd G, groups dropped for zero reward variance,
several groups per row and several micro-batches, with and without the KL term; the per-token
log-probs (policy and reference), the loss, the statistics and every parameter gradient of the
shared-prefix layout equal the padded one (log-probs max abs 1e-6, gradients max relative 1e-5).
SFT / LM: packed rows equal right-padded rows likewise.
"""

import pytest
import torch

from singleturn.trainer.data import Example
from singleturn.trainer.forward_backward import action_logprobs
from singleturn.trainer.policy_loss import (
    Layout,
    fill_reference_logprobs,
    grpo_forward_backward,
    micro_batches,
    select_sequences,
)
from singleturn.trainer.stages.sft import sft_forward_backward

V = 53


def _model(seed: int):
    from singleturn.model import LlamaConfig, Transformer

    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, ffn_dim=64, max_seq_len=256)
    m = Transformer(cfg)
    m.init_weights(seed=seed)
    return m


def _batch(m, G: int, seed: int, chained: bool = False):
    """A GRPO batch: 5 states of ragged prompt length, G ragged responses each, 0/1 rewards with
    two zero-variance groups (dropped), behaviour log-probs = the policy's own plus noise.
    chained: prompts 0, 1, 3, 4 are prefixes of one 30-token trunk (states of one episode in the
    append-only format, out of order), prompt 2 is its own."""
    from singleturn.kernels.token_logprobs import token_logprobs
    from singleturn.trainer.data import pack_completions

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, V, (int(n),), generator=gen).tolist() for n in (7, 19, 3, 12, 30)]
    if chained:
        prompts = [prompts[4][:n] if i != 2 else prompts[2] for i, n in enumerate((7, 19, 3, 12, 30))]
    responses = [
        torch.randint(1, V, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(len(prompts) * G)
    ]
    rewards = torch.randint(0, 2, (len(prompts), G), generator=gen).float()
    rewards[1] = 1.0  # zero variance: dropped
    rewards[3] = 0.0  # zero variance: dropped
    rewards[0, 0], rewards[0, 1] = 1.0, 0.0  # the others have variance
    rewards[2, 0], rewards[2, 1] = 1.0, 0.0
    rewards[4, 0], rewards[4, 1] = 1.0, 0.0
    with torch.no_grad():
        pk = pack_completions([prompts[i // G] for i in range(len(responses))], responses)
        lp = token_logprobs(m.hidden(pk.tokens)[pk.rows, pk.cols], m.output.weight, pk.targets)
    noise = 0.3 * torch.randn(lp.shape, generator=gen)  # ratios != 1: some tokens clip
    logprobs = [(lp + noise)[pk.seq == i].clone() for i in range(len(responses))]
    batch = select_sequences(prompts, responses, logprobs, rewards.view(-1), G)
    assert batch.zero_var_groups == 2 and len(batch.sequences) == 3 * G
    return batch


LAYOUTS = {
    "padded": Layout(shared_prefix=False, micro_batch_size=4),
    # A small budget: two or three groups per row, several micro-batches.
    "shared": Layout(shared_prefix=True, max_tokens=45, row_len=45),
}


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_prefix_chains_update_equals_padded(kl_coef):
    """Layout(prefix_chains=True): the chained groups' prompts are computed once as one trunk with every
    response branched off where its prompt ends; log-probs, reference log-probs, loss, statistics and
    gradients equal the padded path's (fp32)."""
    G = 3
    layouts = {
        "padded": LAYOUTS["padded"],
        "chains": Layout(shared_prefix=True, prefix_chains=True, max_tokens=120, row_len=120),
    }
    out = {}
    for name, layout in layouts.items():
        m, ref = _model(0), _model(1)
        batch = _batch(m, G, seed=5, chained=True)
        mbs = micro_batches(batch, layout)
        if name == "chains":
            kept = {len(s.prompt) for s in batch.sequences}
            assert kept == {7, 3, 30}  # groups 1 and 3 dropped (zero variance); 7 and 30 chain, 3 alone
            trunk_tokens = sum(int((mb.packed.mask.branch == 0).sum()) for mb in mbs)
            assert trunk_tokens == 30 + 3  # every prompt token once: the 30-token trunk + the lone prompt
            per_group = micro_batches(batch, Layout(shared_prefix=True, max_tokens=120, row_len=120))
            assert sum(int((mb.packed.mask.branch == 0).sum()) for mb in per_group) == 30 + 7 + 3
        out[name] = _update(m, ref, mbs, batch, kl_coef)
    a, b = out["padded"], out["chains"]
    for x, y in zip(a["logp"] + a["ref"], b["logp"] + b["ref"]):
        assert x.shape == y.shape and (x - y).abs().max().item() <= 1e-6
    for k in ("loss", "clip_frac", "ratio", "kl"):
        assert b["stats"][k] == pytest.approx(a["stats"][k], rel=1e-5, abs=1e-7), k
    _assert_grads_equal(a["grads"], b["grads"])


def _update(m, ref, mbs, batch, kl_coef) -> dict:
    """One GRPO update over `mbs`: its stats, gradients, and each sequence's action and reference log-probs."""
    if kl_coef:
        fill_reference_logprobs(ref, lambda ref=ref: ref.output.weight, mbs, temperature=1.0)
    with torch.no_grad():
        logp = {}
        for mb in mbs:
            lp = action_logprobs(m, lambda m=m: m.output.weight, mb.packed)
            for b, s in enumerate(mb.sequences):
                logp[id(s)] = lp[mb.packed.seq == b]
    n_tok = float(sum(len(s.response) for s in batch.sequences))
    stats = grpo_forward_backward(
        m,
        lambda m=m: m.output.weight,
        mbs,
        global_tokens=n_tok,
        clip_eps_low=0.2,
        clip_eps_high=0.2,
        kl_coef=kl_coef,
        temperature=1.0,
        device="cpu",
    )
    return {
        "stats": stats,
        "grads": _grads(m),
        "logp": [logp[id(s)] for s in batch.sequences],
        "ref": [s.ref_logp for s in batch.sequences] if kl_coef else [],
    }


def _grads(m) -> dict:
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _assert_grads_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        scale = a[k].abs().max().item()
        err = (a[k] - b[k]).abs().max().item()
        assert err <= 1e-5 * max(scale, 1e-12), f"{k}: max abs diff {err:.3g} (max |g| {scale:.3g})"


@pytest.mark.parametrize("G", [3, 4])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_shared_prefix_update_equals_padded(G, kl_coef):
    out = {}
    for name, layout in LAYOUTS.items():
        m, ref = _model(0), _model(1)
        batch = _batch(m, G, seed=G)
        mbs = micro_batches(batch, layout)
        if name == "shared":
            two_groups_in_a_row = any(int(mb.packed.mask.segment.max()) >= 1 for mb in mbs)
            assert len(mbs) > 1 and two_groups_in_a_row, "the fixture must exercise packing"
            assert sum(mb.packed.computed_tokens for mb in mbs) < sum(
                len(s.prompt) + len(s.response) for s in batch.sequences
            ), "the shared layout computes fewer tokens than the padded one's sequences"
        out[name] = _update(m, ref, mbs, batch, kl_coef)
    a, b = out["padded"], out["shared"]
    for x, y in zip(a["logp"] + a["ref"], b["logp"] + b["ref"]):
        assert x.shape == y.shape and (x - y).abs().max().item() <= 1e-6
    assert a["stats"]["clip_frac"] > 0, "the fixture must exercise clipping"
    for k in ("loss", "clip_frac", "ratio", "kl"):
        assert b["stats"][k] == pytest.approx(a["stats"][k], rel=1e-5, abs=1e-7), k
    _assert_grads_equal(a["grads"], b["grads"])


def test_zero_weight_dummies_pad_the_shared_layout(monkeypatch):
    """A rank with fewer micro-batches than another runs zero-weight dummies: exactly zero gradient."""
    import singleturn.trainer.forward_backward as fb

    m = _model(0)
    batch = _batch(m, 3, seed=3)
    batch.sequences = []  # this rank kept nothing; another rank (simulated) has 2 micro-batches
    monkeypatch.setattr(fb, "all_reduce_max", lambda n: 2)
    mbs = micro_batches(batch, LAYOUTS["shared"])
    assert len(mbs) == 2 and all(mb.weight == 0.0 and mb.packed.mask is not None for mb in mbs)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0, temperature=1.0, device="cpu")
    stats = grpo_forward_backward(m, lambda: m.output.weight, mbs, global_tokens=1.0, **kw)
    assert stats["loss"] == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in m.parameters())


@pytest.mark.parametrize("lm", [False, True])
def test_packed_sft_equals_padded(lm):
    gen = torch.Generator().manual_seed(7)
    exs = []
    for _ in range(9):
        p = torch.randint(1, V, (int(torch.randint(2, 40, (1,), generator=gen)),), generator=gen).tolist()
        t = torch.randint(1, V, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
        exs.append(Example(p[:1], p[1:] + t, {}) if lm else Example(p, t, {}))
    res = {}
    for packing in (False, True):
        m = _model(2)
        stats = sft_forward_backward(
            m,
            lambda m=m: m.output.weight,
            exs,
            micro_batch_size=4,
            packing=packing,
            max_tokens=64,
            row_len=64,
            device="cpu",
        )
        res[packing] = (stats, _grads(m))
    (s0, g0), (s1, g1) = res[False], res[True]
    assert s0["num_tokens"] == s1["num_tokens"]
    assert s1["loss"] == pytest.approx(s0["loss"], rel=1e-5)
    assert s1["action_prob"] == pytest.approx(s0["action_prob"], rel=1e-5, abs=1e-12)
    _assert_grads_equal(g0, g1)
