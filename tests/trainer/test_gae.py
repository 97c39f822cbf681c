"""GAE, returns, the value loss and whitening against hand-computed values and a scalar reference."""

import math

import pytest
import torch

from singleturn.trainer.gae import compute_gae, episode_rewards, masked_whiten, turn_mask, value_loss
from singleturn.trainer.value import ValueHead, state_features


def _close(actual, expected, what, atol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    err = (actual - expected).abs()
    assert err.max() <= atol, (
        f"{what}: max |err| {float(err.max()):.3g} at {int(err.argmax())}: {actual} vs {expected}"
    )


def _gae_scalar(rewards, values, gamma, lam, last_value=0.0):
    """Textbook per-episode GAE (one python float at a time): the reference."""
    L = len(rewards)
    adv = [0.0] * L
    running = 0.0
    for t in reversed(range(L)):
        nv = values[t + 1] if t + 1 < L else last_value
        delta = rewards[t] + gamma * nv - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_hand_computed():
    # L = 3, success at the end. gamma 0.9, lam 0.8:
    # delta2 = 1 - 0.7 = 0.3                     A2 = 0.3
    # delta1 = 0.9*0.7 - 0.6 = 0.03              A1 = 0.03 + 0.72*0.3 = 0.246
    # delta0 = 0.9*0.6 - 0.5 = 0.04              A0 = 0.04 + 0.72*0.246 = 0.21712
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    m = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = compute_gae(r, v, m, gamma=0.9, lam=0.8)
    _close(adv, [[0.21712, 0.246, 0.3]], "advantages")
    _close(ret, [[0.71712, 0.846, 1.0]], "returns")
    # lam = 1: returns are the discounted Monte Carlo returns, whatever the values.
    adv, ret = compute_gae(r, v, m, gamma=0.9, lam=1.0)
    _close(ret, [[0.81, 0.9, 1.0]], "lam=1 returns")
    _close(adv, [[0.31, 0.3, 0.3]], "lam=1 advantages")
    # lam = 0: one-step TD errors.
    adv, _ = compute_gae(r, v, m, gamma=0.9, lam=0.0)
    _close(adv, [[0.04, 0.03, 0.3]], "lam=0 advantages")


def test_gae_padding_and_bootstrap():
    # Row 0: 2 turns, failed, cut by the step limit -> bootstrap with V(s_2) = 0.5.
    # delta1 = 0 + 1.0*0.5 - 0.2 = 0.3 ; A1 = 0.3 ; delta0 = 0.2 - 0.1 = 0.1 ; A0 = 0.1 + 0.5*0.3 = 0.25
    # Row 1: 3 turns, won, terminal.
    won = torch.tensor([False, True])
    lengths = torch.tensor([2, 3])
    r = episode_rewards(won, lengths, 4)
    _close(r, [[0, 0, 0, 0], [0, 0, 1, 0]], "rewards")
    m = turn_mask(lengths, 4)
    v = torch.tensor([[0.1, 0.2, 9.0, 9.0], [0.0, 0.0, 0.0, 9.0]])  # 9.0 on padded turns must not leak
    adv, ret = compute_gae(r, v, m, gamma=1.0, lam=0.5, last_values=torch.tensor([0.5, 0.0]))
    _close(adv[0], [0.25, 0.3, 0, 0], "bootstrapped row")
    _close(adv[1], [0.25, 0.5, 1.0, 0], "won row (gamma 1, lam 0.5, V 0)")
    _close(ret[0], [0.35, 0.5, 0, 0], "bootstrapped returns")
    assert torch.equal(adv[~m], torch.zeros(int((~m).sum()))), "padded turns must be exactly 0"


def test_success_discount():
    r = episode_rewards(torch.tensor([True, True, False]), torch.tensor([1, 4, 3]), 5, success_discount=0.9)
    _close(r.sum(1), [1.0, 0.9**3, 0.0], "discounted success")
    assert r[2].abs().sum() == 0
    assert episode_rewards(torch.tensor([True]), torch.tensor([0]), 3).abs().sum() == 0, "empty episode"


@pytest.mark.parametrize("B,T", [(1, 1), (5, 7), (13, 37)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_scalar_reference(B, T, gamma, lam):
    g = torch.Generator().manual_seed(B * 100 + T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    won = torch.rand(B, generator=g) < 0.5
    values = torch.rand(B, T, generator=g)
    boot = torch.rand(B, generator=g)
    r = episode_rewards(won, lengths, T, success_discount=0.97)
    m = turn_mask(lengths, T)
    adv, ret = compute_gae(r, values, m, gamma=gamma, lam=lam, last_values=boot)
    for b in range(B):
        L = int(lengths[b])
        a_ref, r_ref = _gae_scalar(r[b, :L].tolist(), values[b, :L].tolist(), gamma, lam, float(boot[b]))
        _close(adv[b, :L], a_ref, f"adv row {b}", atol=1e-5)
        _close(ret[b, :L], r_ref, f"ret row {b}", atol=1e-5)
        assert adv[b, L:].abs().sum() == 0 and ret[b, L:].abs().sum() == 0


def test_value_loss_hand_computed_and_grad():
    v = torch.tensor([0.5, 0.0, 2.0], requires_grad=True)
    R = torch.tensor([1.0, 0.0, 0.0])
    out = value_loss(v, R)
    _close(out.loss, 0.5 * (0.25 + 0 + 4.0), "loss")
    out.loss.backward()
    _close(v.grad, [-0.5, 0.0, 2.0], "d loss / d v = v - R")
    assert int(out.num) == 3


def test_value_loss_clipped_hand_computed():
    # old = 0, eps = 0.2. v=0.5,R=1: unclipped .25, clipped (0.2-1)^2=.64 -> max .64 (clipped branch:
    # the gradient is 0 because clamp is saturated). v=-0.1,R=1: unclipped 1.21, clipped (-0.1-1)^2 same
    # -> 1.21, grad v-R = -1.1. v=0.5,R=0 masked.
    v = torch.tensor([0.5, -0.1, 0.5], requires_grad=True)
    R = torch.tensor([1.0, 1.0, 0.0])
    old = torch.zeros(3)
    mask = torch.tensor([True, True, False])
    out = value_loss(v, R, old_values=old, clip_eps=0.2, mask=mask)
    _close(out.loss, 0.5 * (0.64 + 1.21), "clipped loss")
    assert float(out.clip_frac) == 1.0 and int(out.num) == 2
    out.loss.backward()
    _close(v.grad, [0.0, -1.1, 0.0], "clipped grads (masked entry exactly 0)")
    with pytest.raises(ValueError, match="old_values"):
        value_loss(v, R, clip_eps=0.2)


def test_masked_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([True, True, True, False])
    std = math.sqrt(2 / 3)
    _close(masked_whiten(x, m, eps=0.0), [-1 / std, 0.0, 1 / std, 0.0], "whitened")
    for c in (0.3, 0.1, 1 / 3):  # x - mean is not exactly 0 in floating point for some constants
        const = torch.full((7,), c)
        const[6] = 5.0  # masked out
        mask7 = torch.tensor([True] * 6 + [False])
        _close(masked_whiten(const, mask7), [0.0] * 7, f"constant batch {c} -> exactly 0", atol=0.0)
    _close(masked_whiten(x, torch.zeros(4, dtype=torch.bool)), [0.0] * 4, "empty mask", atol=0.0)


def test_value_head_starts_at_zero_and_regresses():
    torch.manual_seed(0)
    D = 37
    feats = torch.randn(64, D)
    target = feats @ torch.randn(D) * 0.1
    for hidden in (0, 16):
        head = ValueHead(D, hidden_dim=hidden)
        assert torch.equal(head(feats), torch.zeros(64)), "zero-initialized output layer"
        opt = torch.optim.Adam(head.parameters(), lr=3e-2)
        first = None
        for _ in range(60):
            loss = value_loss(head(feats), target).loss / 64
            first = first if first is not None else float(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
        last = float(loss.detach())
        assert last < 0.05 * first, f"hidden={hidden}: value regression {first:.4f} -> {last:.4f}"


def test_state_features_pick_last_prompt_token():
    from singleturn.model import LlamaConfig, Transformer

    torch.manual_seed(0)
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=61, ffn_dim=64, max_seq_len=64)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    feats = state_features(model, prompts, pad_id=0, device="cpu", micro_batch_size=2)
    assert feats.shape == (3, 32)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = model.hidden(torch.tensor([p]))[0, -1]
            _close(feats[i], ref, f"feature {i}", atol=1e-5)


def test_state_features_read_prefix_chains_off_one_forward():
    """Episode-format turns extend one another: only the prompts that extend no other are computed,
    and every feature equals the prompt's own forward (float64)."""
    from singleturn.model import LlamaConfig, Transformer
    from singleturn.trainer.value import prefix_hosts

    torch.manual_seed(0)
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, ffn_dim=64, max_seq_len=64)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model.double()
    ep = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    prompts = [ep[:3], ep[:6], ep, [1, 2], ep[:6] + [40, 41], [1, 2, 3], ep[:3], [50]]
    # hosts: ep hosts ep[:3], ep[:6] and the duplicate ep[:3]; the branch ep[:6]+[40,41] and the chain
    # [1,2] -> [1,2,3] and [50] host themselves or their extension.
    assert prefix_hosts(prompts) == [2, 2, 2, 5, 4, 5, 2, 7]
    shapes = []
    hidden = model.hidden
    model.hidden = lambda t: shapes.append(tuple(t.shape)) or hidden(t)
    feats = state_features(model, prompts, pad_id=0, device="cpu", micro_batch_size=2)
    assert shapes == [(2, 10), (2, 3)], shapes  # 4 hosts, longest first, 2 per micro-batch
    assert feats.shape == (len(prompts), 32)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = hidden(torch.tensor([p]))[0, -1].float()
            _close(feats[i], ref, f"feature {i}", atol=1e-6)
