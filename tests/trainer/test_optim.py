"""The guarded optimizer step: a non-finite loss, gradient norm or update never reaches the weights
or the AdamW state, each skip names its cause, and consecutive ones stop the run."""

import pytest
import torch

from singleturn.trainer.config import build_config
from singleturn.trainer.fsdp import apply_fsdp
from singleturn.trainer.optim import NonFiniteError, make_optimizer, optimizer_step
from singleturn.trainer.stages import StageContext


def _setup(lr: float):
    from singleturn.model import LlamaConfig, Transformer

    m = Transformer(LlamaConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=31, ffn_dim=32))
    m.init_weights(seed=0)
    fsdp = apply_fsdp(m)
    cfg = build_config({"optim": {"lr": lr}, "run": {"max_nonfinite_steps": 2}})
    return m, fsdp, make_optimizer(fsdp, cfg.optim, lr), cfg


def _backward(m):
    x = torch.randint(0, 31, (2, 7), generator=torch.Generator().manual_seed(0))
    m(x).float().logsumexp(-1).mean().backward()


def _state(fsdp, opt):
    params = [p.detach().clone() for p in fsdp.parameters()]
    moments = {k: v.clone() for p in fsdp.parameters() for k, v in opt.state.get(p, {}).items()}
    return params, moments


@pytest.mark.parametrize("lr", [1e37, 3e38])  # the update overflows; AdamW's step size overflows
def test_overflowing_update_is_undone_exactly(lr):
    m, fsdp, opt, cfg = _setup(lr=1e-3)
    _backward(m)
    assert optimizer_step(fsdp, opt, lr=1e-3, grad_clip=1.0, nonfinite=0).applied  # AdamW state exists
    _backward(m)
    with torch.no_grad():  # weights near the fp32 limit: any step of ~1e37 overflows some of them
        w = fsdp.parameters()[0]
        w.copy_(torch.where(torch.arange(w.numel()) % 2 == 0, 3.39e38, -3.39e38).view_as(w))
    before = _state(fsdp, opt)
    res = optimizer_step(fsdp, opt, lr=lr, grad_clip=1.0, nonfinite=0)
    assert not res.applied and res.cause == "nonfinite_update"
    after = _state(fsdp, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "parameters untouched"
    assert before[1].keys() == after[1].keys() and all(
        torch.equal(before[1][k], after[1][k]) for k in before[1]
    )
    assert all(p.grad is None for p in fsdp.parameters())
    assert all(torch.isfinite(p).all() for p in fsdp.parameters())


def test_nonfinite_loss_and_norm_skip_without_touching_weights():
    m, fsdp, opt, _ = _setup(lr=1e-3)
    _backward(m)
    before = _state(fsdp, opt)
    assert optimizer_step(fsdp, opt, lr=1e-3, grad_clip=1.0, nonfinite=1).cause == "nonfinite_loss"
    for p in fsdp.parameters():
        p.grad = torch.full_like(p, float("nan"))
    assert optimizer_step(fsdp, opt, lr=1e-3, grad_clip=1.0, nonfinite=0).cause == "nonfinite_grad_norm"
    assert all(torch.equal(a, p) for a, p in zip(before[0], fsdp.parameters()))


def test_consecutive_nonfinite_updates_stop_the_run():
    m, fsdp, opt, cfg = _setup(lr=1e-3)
    ctx = StageContext(model=m, fsdp=fsdp, tokenizer=None, examples=[], cfg=cfg, info=None, optimizer=opt)
    _backward(m)
    assert ctx.apply_update(1e-3, 1)[1] is False
    assert ctx.nonfinite_steps == 1 and ctx.last_skip == "nonfinite_loss"
    _backward(m)
    ctx.apply_update(1e-3, 0)  # a good step resets the streak
    assert ctx.nonfinite_streak == 0 and ctx.nonfinite_steps == 1
    _backward(m)
    ctx.apply_update(1e-3, 1)
    _backward(m)
    with pytest.raises(NonFiniteError, match="2 consecutive non-finite updates"):
        ctx.apply_update(1e-3, 1)
