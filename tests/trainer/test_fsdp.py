"""Hand FSDP (trainer/fsdp.py) on 2 CPU ranks (gloo) against single-process training and FSDP2.

One `torchrun --nproc_per_node=2 tests/trainer/fsdp_worker.py --phase fsdp` per module runs every
scenario (see the worker's docstring) and writes JSON; the tests below assert on it.
Tolerances (fp32): losses equal to 1e-6 relative (the global loss is a sum of two per-rank sums in
one layout and one sum in the other: a few fp32 ulps), parameters after 3 AdamW steps to 1e-5.

PyTorch FSDP2 (`fully_shard`) runs on CPU with gloo in torch 2.13 (device mesh "cpu"), so the
comparison is direct. FSDP2 needs the root module's forward to run (it unshards in the root's
pre-forward hook), so that comparison uses `model(tokens)`; the single-process comparison uses the
trainer's `model.hidden(tokens)` + `model.output.weight` pattern.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fsdp_worker.py")
LOSS_RTOL, PARAM_ATOL = 1e-6, 1e-5


def run_worker(out: Path, phase: str, nproc: int | None) -> dict:
    """Run one worker phase (under torchrun when nproc is given); return its JSON results."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc else [sys.executable]), str(WORKER), "--out", str(out), "--phase", phase]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / f"{phase}.json").read_text())


def assert_losses_equal(got, want, what):
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= LOSS_RTOL * max(1.0, abs(b)), (
            f"{what}: step {step} loss {a!r} vs {b!r} ({a - b:+.3g})"
        )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("fsdp"), "fsdp", nproc=2)


CASES = [f"tied={t},ac={a}" for t in (False, True) for a in (False, True)]


@pytest.mark.parametrize("case", CASES)
def test_hand_fsdp_matches_single_process(results, case):
    r = results["parity"][case]
    assert_losses_equal(r["losses"], r["ref_losses"], f"hand FSDP vs single process [{case}]")
    assert r["param_diff"] <= PARAM_ATOL, (
        f"[{case}] max |param - reference| = {r['param_diff']:.3g} after 3 steps"
    )
    # the global grad norm (before clipping) is the single-process one, and clipping was active
    for step, (a, b) in enumerate(zip(r["norms"], r["ref_norms"])):
        assert abs(a - b) <= 1e-5 * b, f"[{case}] step {step}: grad norm {a} vs {b}"
        assert b > 0.5, f"[{case}] step {step}: grad norm {b} <= clip 0.5, clipping not exercised"


@pytest.mark.parametrize("case", ["tied=False,fp32", "tied=True,fp32", "tied=False,bf16"])
def test_hand_fsdp_matches_pytorch_fsdp2(results, case):
    # bf16: both compute in bf16 from fp32 masters and reduce in fp32, so they agree as tightly
    r = results["fsdp2"][case]
    assert_losses_equal(r["losses"], r["ref_losses"], f"hand FSDP vs FSDP2 [{case}]")
    assert r["param_diff"] <= PARAM_ATOL, f"[{case}] max |hand - FSDP2| = {r['param_diff']:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_gather_free_schedule(results, case):
    """Each unit gathered once in forward and once more in backward (not the untied embedding,
    whose backward reads no weights), one reduce-scatter per unit, nothing left after backward.
    Units alive at once: current block + prefetched block; + the sticky embed_head when tied (the
    untied head is reduced and freed before the last block's backward starts)."""
    r = results["schedule"][case]
    L, tied = r["n_layers"], case.startswith("tied=True")
    n_units = L + (1 if tied else 2)
    want = {"all_gather": n_units + L, "reduce_scatter": n_units, "max_gathered": 3 if tied else 2}
    assert r["step"] == want, f"[{case}] one step: {r['step']}, want {want}"
    assert r["after_step"] == [], f"[{case}] still gathered after the step: {r['after_step']}"
    head = "embed_head" if tied else "head"
    assert r["after_no_grad"] == [head], f"[{case}] after a no-grad hidden(): {r['after_no_grad']}"
    assert r["after_reshard"] == [], f"[{case}] after reshard(): {r['after_reshard']}"


def test_memory_report_is_half_per_rank(results):
    m = results["memory"]
    assert m["world_size"] == 2
    # fp32 params + grads + AdamW exp_avg, exp_avg_sq = 16 bytes per parameter, halved
    assert m["total_bytes"] == m["param_bytes"] + m["grad_bytes"] + m["optim_bytes"]
    full = 16 * m["unsharded_numel"]
    assert m["unsharded_bytes"] == full, f"unsharded {m['unsharded_bytes']} vs 16 B x {m['unsharded_numel']}"
    assert abs(m["total_bytes"] / full - 0.5) < 0.01, (
        f"per-rank share {m['total_bytes'] / full:.3f}, want ~0.5"
    )


def _tiny(tied=False):
    from singleturn.model.config import LlamaConfig
    from singleturn.model.transformer import Transformer

    cfg = LlamaConfig(
        dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=37, ffn_dim=24, tie_word_embeddings=tied
    )
    model = Transformer(cfg)
    model.init_weights(seed=0)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_world1_two_forwards_one_backward_and_summon(tied):
    """In-process (no process group): grads of a loss over two forwards equal the plain model's;
    summon_full_params refuses while a backward is pending; writeback=True copies edits back."""
    import copy

    import torch

    from singleturn.trainer.fsdp import apply_fsdp

    ref = _tiny(tied)
    model = copy.deepcopy(ref)
    fsdp = apply_fsdp(model)
    x = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(0))
    ref_loss = ref(x[:1]).logsumexp(-1).sum() + ref(x[1:]).logsumexp(-1).sum()
    ref_loss.backward()
    loss = model(x[:1]).logsumexp(-1).sum() + model(x[1:]).logsumexp(-1).sum()
    with pytest.raises(RuntimeError, match="backward has not run"):
        with fsdp.summon_full_params():
            pass
    loss.backward()
    assert fsdp.gathered_units() == []
    want = {name: p.grad for name, p in ref.named_parameters()}
    for u in fsdp.units:  # world 1: the shard is the whole flat gradient
        for s in u.slots:
            got = u.shard.grad[s.offset : s.offset + s.numel].view(s.shape)
            torch.testing.assert_close(got, want[s.fqns[0]], rtol=1e-6, atol=1e-6, msg=f"grad of {s.fqns}")
    with fsdp.summon_full_params(torch.float32, writeback=True):
        with torch.no_grad():
            model.norm.weight.fill_(3.0)
    assert fsdp.full_state_dict()["norm.weight"].eq(3.0).all(), (
        "writeback=True did not reach the master shard"
    )
