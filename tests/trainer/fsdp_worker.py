"""Worker for tests/trainer/test_fsdp.py and test_checkpoint.py: runs every scenario, writes JSON.

Phases (each test module's fixture runs its phases once, in this order):
test_fsdp.py
    --phase fsdp         `torchrun --nproc_per_node=2`: hand FSDP vs single-process training (tied /
                         untied x activation checkpointing on / off, grad clipping active; with AC
                         also 2 micro-batches and no-grad forwards + summon_full_params between
                         steps), hand FSDP vs PyTorch FSDP2 (`fully_shard`), memory report
test_checkpoint.py
    --phase ckpt_single  world 1, no process group (the test calls it in-process): the
                         uninterrupted reference losses and a world-1 checkpoint at step 2 (ckpt_w1)
    --phase ckpt_dist    `torchrun --nproc_per_node=2`: 2-rank save at step 2 + continue, resume of
                         the world-1 checkpoint on 2 ranks, corrupt / partial / keep_last
    --phase ckpt_load1   world 1 (in-process too): resumes the 2-rank checkpoint (2 -> 1) and the
                         world-1 one (1 -> 1)
Each phase writes `<out>/<phase>.json` (rank 0); the tests assert on those numbers.

Every rank runs the single-process references locally (tiny model, no collectives), so the
comparison needs no communication beyond what FSDP itself does.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from singleturn.model.config import LlamaConfig
from singleturn.model.transformer import Transformer
from singleturn.trainer.checkpoint import export_final, load_latest_checkpoint, save_checkpoint
from singleturn.trainer.dist import all_reduce_sum, barrier, destroy, init_distributed
from singleturn.trainer.fsdp import apply_fsdp

V, B, T = 101, 4, 13  # vocab and sequence length deliberately unaligned
STEPS, LR, WD, CLIP = 3, 3e-3, 0.1, 0.5  # CLIP below the gradient norms: clipping is active
CKPT_STEPS, CKPT_AT = 4, 2


def build_model(tied: bool) -> Transformer:
    cfg = LlamaConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, ffn_dim=48, tie_word_embeddings=tied
    )
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model


def global_batch(step: int):
    """The same global batch on every rank: tokens (B, T), targets (B, T), loss mask (B, T)."""
    g = torch.Generator().manual_seed(1000 + step)
    tok = torch.randint(0, V, (B, T + 1), generator=g)
    lengths = torch.tensor([T, 7, 11, 3])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # ragged sequences
    return tok[:, :-1], tok[:, 1:], mask


def loss_hidden(model, x, y, mask, n_global):
    """The trainer's pattern: hidden states, then the head weight used OUTSIDE any module forward."""
    h = model.hidden(x)  # (b, T, D)
    logp = torch.log_softmax((h @ model.output.weight.t()).float(), dim=-1)  # (b, T, V)
    return -(logp.gather(-1, y[..., None])[..., 0] * mask).sum() / n_global


def loss_logits(model, x, y, mask, n_global):
    """Through `model(tokens)` (the head's own forward): what PyTorch FSDP2 needs."""
    ce = F.cross_entropy(model(x).float().reshape(-1, V), y.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1)).sum() / n_global


def make_opt(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=WD, betas=(0.9, 0.95))


def train_reference(model, steps, loss_fn, opt=None, start=0):
    """Single-process training on the full global batch; returns (losses, grad norms, opt)."""
    opt = opt or make_opt(model.parameters())
    losses, norms = [], []
    for step in range(start, start + steps):
        x, y, m = global_batch(step)
        loss = loss_fn(model, x, y, m, m.sum())
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        losses.append(loss.item())
    return losses, norms, opt


def train_hand(model, fsdp, opt, info, steps, loss_fn, *, start=0, micro=1, interleave=False):
    """Hand FSDP: rank r takes rows [r*B/W, (r+1)*B/W) of the global batch, in `micro` micro-batches."""
    W, r = info.world_size, info.rank
    losses, norms = [], []
    for step in range(start, start + steps):
        x, y, m = global_batch(step)
        if interleave:  # what a GRPO step does between optimizer steps: no-grad forwards, rollouts
            with torch.no_grad():
                loss_hidden(model, x, y, m, m.sum())
            with fsdp.summon_full_params(torch.bfloat16), torch.no_grad():
                model(x[:1])
        lo, hi = r * B // W, (r + 1) * B // W
        opt.zero_grad()
        local = 0.0
        for xs, ys, ms in zip(*(t[lo:hi].chunk(micro) for t in (x, y, m))):
            loss = loss_fn(model, xs, ys, ms, m.sum())  # normalized by the GLOBAL token count
            loss.backward()
            local += loss.item()
        norms.append(float(fsdp.clip_grad_norm_(CLIP)))
        opt.step()
        losses.append(float(all_reduce_sum(local)))
    return losses, norms


def max_param_diff(full_sd: dict, ref: torch.nn.Module) -> float:
    return max((full_sd[k] - v.detach()).abs().max().item() for k, v in ref.state_dict().items())


def scenario_parity(info, tied, ac, micro, interleave):
    ref = build_model(tied)
    ref_losses, ref_norms, _ = train_reference(ref, STEPS, loss_hidden)
    model = build_model(tied)
    fsdp = apply_fsdp(model, activation_checkpointing=ac)
    losses, norms = train_hand(
        model, fsdp, make_opt(fsdp.parameters()), info, STEPS, loss_hidden, micro=micro, interleave=interleave
    )
    return {
        "ref_losses": ref_losses,
        "losses": losses,
        "ref_norms": ref_norms,
        "norms": norms,
        "param_diff": max_param_diff(fsdp.full_state_dict(), ref),
    }


def scenario_fsdp2(info, tied, param_dtype=torch.float32):
    """Hand FSDP vs torch.distributed.fsdp.fully_shard with the same MixedPrecisionPolicy
    (param_dtype for compute, fp32 gradient reduction, fp32 master weights), CPU + gloo."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    ref = build_model(tied)
    for blk in ref.layers:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    fully_shard(ref, mesh=mesh, mp_policy=mp)  # root: embeddings, norm, head
    # FSDP2 averages gradients over ranks; the loss is normalized by the global token count, so
    # the local losses are scaled by the world size to get the same (summed) gradient.
    W, r = info.world_size, info.rank
    opt2 = make_opt(ref.parameters())
    ref_losses = []
    for step in range(STEPS):
        x, y, m = global_batch(step)
        lo, hi = r * B // W, (r + 1) * B // W
        loss = loss_logits(ref, x[lo:hi], y[lo:hi], m[lo:hi], m.sum())
        opt2.zero_grad()
        (loss * W).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt2.step()
        ref_losses.append(float(all_reduce_sum(loss.item())))
    ref_sd = {k: v.full_tensor() for k, v in ref.state_dict().items()}

    model = build_model(tied)
    fsdp = apply_fsdp(model, param_dtype=param_dtype, reduce_dtype=torch.float32)
    losses, _ = train_hand(model, fsdp, make_opt(fsdp.parameters()), info, STEPS, loss_logits)
    full = fsdp.full_state_dict()
    diff = max((full[k] - v).abs().max().item() for k, v in ref_sd.items())
    return {"ref_losses": ref_losses, "losses": losses, "param_diff": diff}


def scenario_schedule(info, tied, ac):
    """Collective counts and what stays gathered: one training step, then a no-grad forward."""
    model = build_model(tied)
    fsdp = apply_fsdp(model, activation_checkpointing=ac)
    train_hand(model, fsdp, make_opt(fsdp.parameters()), info, 1, loss_hidden)
    res = {"n_layers": len(model.layers), "step": dict(fsdp.stats), "after_step": fsdp.gathered_units()}
    x, y, m = global_batch(0)
    with torch.no_grad():
        loss_hidden(model, x, y, m, m.sum())  # the head weight must stay usable after hidden()
    res["after_no_grad"] = fsdp.gathered_units()
    fsdp.reshard()
    res["after_reshard"] = fsdp.gathered_units()
    return res


def scenario_memory(info):
    model = build_model(tied=False)
    fsdp = apply_fsdp(model)
    opt = make_opt(fsdp.parameters())
    train_hand(model, fsdp, opt, info, 1, loss_hidden)
    rep = fsdp.memory_report(opt)
    unsharded_numel = sum(p.numel() for p in build_model(tied=False).parameters())
    return rep | {"unsharded_numel": unsharded_numel}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_ckpt(info, run_dir, *, resume: bool, steps_before: int, steps_after: int, keep_last=3, extra=None):
    """Train steps_before steps (or resume from run_dir), save, train steps_after; return losses."""
    model = build_model(tied=False)
    fsdp = apply_fsdp(model)
    opt = make_opt(fsdp.parameters())
    start, loaded = 0, None
    if resume:
        loaded = load_latest_checkpoint(run_dir, fsdp=fsdp, optimizer=opt)
        start = loaded["step"]
    before, _ = train_hand(model, fsdp, opt, info, steps_before, loss_hidden, start=start)
    if steps_before:
        save_checkpoint(
            run_dir, start + steps_before, fsdp=fsdp, optimizer=opt, extra=extra or {}, keep_last=keep_last
        )
    after, _ = train_hand(model, fsdp, opt, info, steps_after, loss_hidden, start=start + steps_before)
    return {"losses_before": before, "losses_after": after, "loaded": loaded}


def phase_ckpt_single(out: Path, info):
    ref_losses, _, _ = train_reference(build_model(tied=False), CKPT_STEPS, loss_hidden)
    w1 = run_ckpt(
        info,
        out / "ckpt_w1",
        resume=False,
        steps_before=CKPT_AT,
        steps_after=CKPT_STEPS - CKPT_AT,
        extra={"tag": "w1"},
    )
    return {"ref_losses": ref_losses, "w1": w1["losses_before"] + w1["losses_after"]}


def phase_fsdp(out: Path, info):
    res = {"world_size": info.world_size, "parity": {}, "fsdp2": {}}
    for tied in (False, True):
        for ac in (False, True):
            # micro-batches and interleaved no-grad forwards / summon in half of the cases
            res["parity"][f"tied={tied},ac={ac}"] = scenario_parity(
                info, tied, ac, micro=1 + ac, interleave=ac
            )
        res["fsdp2"][f"tied={tied},fp32"] = scenario_fsdp2(info, tied)
    res["fsdp2"]["tied=False,bf16"] = scenario_fsdp2(info, False, torch.bfloat16)
    res["memory"] = scenario_memory(info)
    res["schedule"] = {
        f"tied={t},ac={a}": scenario_schedule(info, t, a) for t in (False, True) for a in (False, True)
    }
    return res


def phase_ckpt_dist(out: Path, info):
    res = {"world_size": info.world_size}
    extra = {"tag": f"w2-rank{info.rank}", "rng": torch.get_rng_state()}
    res["w2"] = run_ckpt(
        info,
        out / "ckpt_w2",
        resume=False,
        steps_before=CKPT_AT,
        steps_after=CKPT_STEPS - CKPT_AT,
        extra=extra,
    )
    r22 = run_ckpt(info, out / "ckpt_w2", resume=True, steps_before=0, steps_after=CKPT_STEPS - CKPT_AT)
    res["w2_to_w2"] = r22["losses_after"]
    r12 = run_ckpt(info, out / "ckpt_w1", resume=True, steps_before=0, steps_after=CKPT_STEPS - CKPT_AT)
    res["w1_to_w2"] = {
        "losses": r12["losses_after"],
        "step": r12["loaded"]["step"],
        "tag": r12["loaded"]["tag"],
    }

    # corrupt / partial / keep_last: steps 1, 2, 3 saved with keep_last=2, then step 3 truncated
    bad = out / "ckpt_bad"
    run_ckpt(info, bad, resume=False, steps_before=1, steps_after=0, keep_last=2)
    for _ in range(2):
        run_ckpt(info, bad, resume=True, steps_before=1, steps_after=0, keep_last=2)
    root = bad / "checkpoints"
    res["kept"] = sorted(p.name for p in root.iterdir())
    if info.rank == 0:
        shard = root / "step_3" / "shard_rank1.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])
        (root / ".tmp_step_4").mkdir()  # a save that died before its rename
        (root / "step_5").mkdir()  # a directory without a manifest
        (root / "step_5" / "shard_rank0.safetensors").write_bytes(b"")
    barrier()
    collect = _Collect()
    logging.getLogger("singleturn.trainer.checkpoint").addHandler(collect)
    model = build_model(tied=False)
    fsdp = apply_fsdp(model)
    loaded = load_latest_checkpoint(bad, fsdp=fsdp, optimizer=make_opt(fsdp.parameters()))
    res["bad"] = {"loaded_step": loaded["step"], "log": collect.lines}
    res["export"] = scenario_export(info, out)
    return res


def scenario_export(info, out: Path):
    """export_final -> HF directory; model.load_hf_checkpoint must give back the trained weights."""
    from singleturn.model.hf_io import load_hf_checkpoint

    model = build_model(tied=True)
    fsdp = apply_fsdp(model)
    train_hand(model, fsdp, make_opt(fsdp.parameters()), info, 1, loss_hidden)
    tok = out / "tokenizer.json"
    if info.rank == 0:
        tok.write_text('{"stand-in": true}')
    barrier()
    final = export_final(out / "final", fsdp, model.config, tok)
    full = fsdp.full_state_dict()
    loaded, cfg = load_hf_checkpoint(final, device="cpu", dtype=torch.float32)
    return {
        "files": sorted(p.name for p in final.iterdir()),
        "param_diff": max((full[k] - v).abs().max().item() for k, v in loaded.state_dict().items()),
        "tied": cfg.tie_word_embeddings,
    }


def phase_ckpt_load1(out: Path, info):
    r21 = run_ckpt(info, out / "ckpt_w2", resume=True, steps_before=0, steps_after=CKPT_STEPS - CKPT_AT)
    r11 = run_ckpt(info, out / "ckpt_w1", resume=True, steps_before=0, steps_after=CKPT_STEPS - CKPT_AT)
    return {
        "losses": r21["losses_after"],
        "step": r21["loaded"]["step"],
        "tag": r21["loaded"]["tag"],
        "w1_to_w1": r11["losses_after"],
    }


PHASES = {
    "fsdp": phase_fsdp,
    "ckpt_single": phase_ckpt_single,
    "ckpt_dist": phase_ckpt_dist,
    "ckpt_load1": phase_ckpt_load1,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phase", choices=list(PHASES), required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    info = init_distributed()
    res = PHASES[args.phase](args.out, info)
    if info.rank == 0:
        (args.out / f"{args.phase}.json").write_text(json.dumps(res, indent=1, default=str))
    destroy()


if __name__ == "__main__":
    main()
