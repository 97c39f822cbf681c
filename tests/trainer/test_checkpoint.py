"""Sharded checkpoints (trainer/checkpoint.py): resume, resharding 2 <-> 1 ranks, corrupt/partial, keep_last,
checksums (same-size corruption falls back to the previous checkpoint), non-finite parameters refused.

The fixture runs three worker phases once for the module (see tests/trainer/fsdp_worker.py):
world 1 in this process (uninterrupted reference losses + a world-1 checkpoint at step 2), ONE
`torchrun --nproc_per_node=2` (2-rank save/continue, 1 -> 2 resume, corrupt/partial/keep_last) and
world 1 in this process again, resuming the 2-rank checkpoint (2 -> 1). Resumed runs must reproduce the
uninterrupted losses (1e-6 relative: 1 and 2 ranks sum the loss in a different order).
The resharding arithmetic with zero padding (numel not divisible by the world size) is tested
directly below on hand-made shard files.
"""

import json
import logging
import re
import struct

import fsdp_worker
import pytest
import torch
from safetensors.torch import save_file
from test_fsdp import assert_losses_equal, run_worker

from singleturn.trainer.checkpoint import (
    CheckpointError,
    _read_range,
    export_final,
    file_crc32,
    load_latest_checkpoint,
    load_moments,
    save_checkpoint,
    verify_checkpoint,
)
from singleturn.trainer.checkpoint_format import manifest_checksum
from singleturn.trainer.dist import DistInfo
from singleturn.trainer.fsdp import apply_fsdp


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    world1 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    # the world-1 phases run in this process (no process group): no extra interpreter start-up
    return {
        "single": fsdp_worker.phase_ckpt_single(out, world1),
        "dist": run_worker(out, "ckpt_dist", nproc=2),
        "load1": fsdp_worker.phase_ckpt_load1(out, world1),
    }


def test_two_rank_save_and_continue_matches_uninterrupted(results):
    ref = results["single"]["ref_losses"]
    w2 = results["dist"]["w2"]
    assert_losses_equal(w2["losses_before"] + w2["losses_after"], ref, "2 ranks vs single process")


def test_world1_hand_fsdp_matches_single_process(results):
    s = results["single"]
    assert_losses_equal(s["w1"], s["ref_losses"], "hand FSDP world 1 vs plain training")


def test_same_world_resume_is_bitwise_exact(results):
    """Same world size: the resumed run repeats the uninterrupted one bit for bit (CPU)."""
    w2, w1 = results["dist"]["w2"]["losses_after"], results["single"]["w1"][2:]
    assert results["dist"]["w2_to_w2"] == w2, f"2 ranks: resumed {results['dist']['w2_to_w2']} vs {w2}"
    assert results["load1"]["w1_to_w1"] == w1, f"1 rank: resumed {results['load1']['w1_to_w1']} vs {w1}"


def test_export_final_roundtrips_through_load_hf_checkpoint(results):
    e = results["dist"]["export"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(e["files"]), e["files"]
    assert e["tied"] and e["param_diff"] == 0.0, f"exported weights differ by {e['param_diff']}"


def test_world1_checkpoint_resumes_on_two_ranks(results):
    ref, r = results["single"]["ref_losses"], results["dist"]["w1_to_w2"]
    assert r["step"] == 2 and r["tag"] == "w1", f"loaded step {r['step']} extra {r['tag']}"
    assert_losses_equal(r["losses"], ref[2:], "resumed 1 -> 2 ranks vs uninterrupted")


def test_two_rank_checkpoint_resumes_on_one_rank(results):
    ref, r = results["single"]["ref_losses"], results["load1"]
    assert r["step"] == 2 and r["tag"] == "w2-rank0", f"loaded step {r['step']} extra {r['tag']}"
    assert_losses_equal(r["losses"], ref[2:], "resumed 2 -> 1 rank vs uninterrupted")


def test_keep_last(results):
    assert results["dist"]["kept"] == ["step_2", "step_3"], results["dist"]["kept"]


def test_corrupt_and_partial_checkpoints_are_skipped(results):
    bad = results["dist"]["bad"]
    log = "\n".join(bad["log"])
    assert bad["loaded_step"] == 2, f"loaded step {bad['loaded_step']}, want 2 (3 is truncated)\n{log}"
    assert any(".tmp_step_4" in line and "partial" in line for line in bad["log"]), log
    assert any("step_5" in line and "no manifest" in line for line in bad["log"]), log
    assert any("step_3" in line and "shard_rank1.safetensors truncated" in line for line in bad["log"]), log


@pytest.mark.parametrize("numel", [7, 12, 37])
@pytest.mark.parametrize("old_world", [1, 3])
@pytest.mark.parametrize("new_world", [1, 2, 4])
def test_read_range_reshards_with_padding(tmp_path, numel, old_world, new_world):
    flat = torch.arange(1, numel + 1, dtype=torch.float32)
    S = -(-numel // old_world)
    padded = torch.cat([flat, torch.zeros(S * old_world - numel)])
    for r in range(old_world):
        save_file(
            {"u/param": padded[r * S : (r + 1) * S].clone()}, str(tmp_path / f"shard_rank{r}.safetensors")
        )
    old = {"name": "u", "numel": numel, "shard_numel": S, "world_size": old_world}
    S2 = -(-numel // new_world)
    want = torch.cat([flat, torch.zeros(S2 * new_world - numel)])
    for r in range(new_world):
        got = _read_range(tmp_path, old, "param", r * S2, (r + 1) * S2)
        torch.testing.assert_close(got, want[r * S2 : (r + 1) * S2], rtol=0, atol=0, msg=f"new rank {r}")


def test_verify_checkpoint_rejects_bad_header(tmp_path):
    save_file({"u/param": torch.ones(5)}, str(tmp_path / "shard_rank0.safetensors"))
    torch.save({}, tmp_path / "extra_rank0.pt")
    files = {f.name: {"bytes": f.stat().st_size, "crc32": file_crc32(f)} for f in tmp_path.iterdir()}
    manifest = {"world_size": 1, "files": files}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "checksum": manifest_checksum(manifest)}))
    assert verify_checkpoint(tmp_path) is None
    shard = tmp_path / "shard_rank0.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8] = ord("x")  # same size, broken JSON header
    shard.write_bytes(bytes(raw))
    assert "header" in verify_checkpoint(tmp_path)


def test_a_manifest_without_checksums_is_refused(tmp_path):
    # Byte sizes only (checkpoints of commits before 2026-12-02): no longer loaded, said so.
    save_file({"u/param": torch.ones(5)}, str(tmp_path / "shard_rank0.safetensors"))
    torch.save({}, tmp_path / "extra_rank0.pt")
    files = {f.name: f.stat().st_size for f in tmp_path.iterdir()}
    (tmp_path / "manifest.json").write_text(json.dumps({"world_size": 1, "files": files}))
    assert "without its bytes and crc32" in verify_checkpoint(tmp_path)


# --- fault injection (world 1, in this process): corruption that keeps sizes, unusable extras,
# --- all checkpoints bad, non-finite parameters


def _train_and_save(run_dir, steps=(1, 2)):
    """Hand FSDP at world 1: one AdamW step, then a checkpoint, per entry of `steps`. Returns the
    master shards after each step ({step: {unit: tensor}}) and the fsdp + optimizer."""
    model = fsdp_worker.build_model(tied=False)
    fsdp = apply_fsdp(model)
    opt = fsdp_worker.make_opt(fsdp.parameters())
    shards = {}
    for s in steps:
        fsdp_worker.train_hand(model, fsdp, opt, WORLD1, 1, fsdp_worker.loss_hidden, start=s - 1)
        save_checkpoint(run_dir, s, fsdp=fsdp, optimizer=opt, extra={"tag": f"step{s}"})
        shards[s] = {n: t.clone() for n, t in fsdp.sharded_state_dict().items()}
    return shards, fsdp, opt


def _load(run_dir):
    fsdp = apply_fsdp(fsdp_worker.build_model(tied=False))
    extra = load_latest_checkpoint(run_dir, fsdp=fsdp, optimizer=fsdp_worker.make_opt(fsdp.parameters()))
    return extra, fsdp


def _flip(path, offset: int, n: int = 64) -> None:
    """Invert n bytes at `offset` in place: the file keeps its size."""
    raw = bytearray(path.read_bytes())
    assert offset + n <= len(raw), f"{path} has {len(raw)} bytes"
    raw[offset : offset + n] = bytes(b ^ 0xFF for b in raw[offset : offset + n])
    path.write_bytes(bytes(raw))


def _safetensors_data_start(path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


WORLD1 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize("target", ["shard", "extra", "manifest"])
def test_same_size_corruption_is_detected_and_the_previous_checkpoint_loads(tmp_path, caplog, target):
    shards, _, _ = _train_and_save(tmp_path)
    step2 = tmp_path / "checkpoints" / "step_2"
    if target == "shard":
        shard = step2 / "shard_rank0.safetensors"
        _flip(shard, _safetensors_data_start(shard) + 100)  # inside the tensor data, header intact
        want = "shard_rank0.safetensors checksum mismatch"
    elif target == "extra":
        extra = step2 / "extra_rank0.pt"
        _flip(extra, extra.stat().st_size // 2)
        want = "extra_rank0.pt checksum mismatch"
    else:  # a digit of the step: the manifest still parses and names every file
        mf = step2 / "manifest.json"
        mf.write_text(mf.read_text().replace('"step": 2', '"step": 7'))
        want = "manifest.json checksum mismatch"
    assert want in (verify_checkpoint(step2) or ""), verify_checkpoint(step2)
    with caplog.at_level(logging.WARNING, logger="singleturn.trainer.checkpoint"):
        extra, fsdp = _load(tmp_path)
    assert (extra["step"], extra["tag"]) == (1, "step1"), f"loaded {extra}"
    for name, t in fsdp.sharded_state_dict().items():
        assert torch.equal(t, shards[1][name]), f"{name}: not the step-1 weights"
    assert any(str(step2) in r.getMessage() and want in r.getMessage() for r in caplog.records), caplog.text
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_1", "step_2.corrupt"], f"{names}: the bad checkpoint is not set aside"


def _rewrite_manifest_entry(ckpt, name: str) -> None:
    """Record `name`'s current size and crc32 (and re-sign the manifest), as if it had been saved so."""
    mf = ckpt / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["files"][name] = {"bytes": (ckpt / name).stat().st_size, "crc32": file_crc32(ckpt / name)}
    manifest["checksum"] = manifest_checksum(manifest)
    mf.write_text(json.dumps(manifest))


def test_extra_that_does_not_unpickle_is_skipped_and_named(tmp_path, caplog):
    """The second line of defence: checksums match (e.g. a pickle of a class that no longer exists),
    yet torch.load fails; the checkpoint is skipped, not the run."""
    _train_and_save(tmp_path)
    step2 = tmp_path / "checkpoints" / "step_2"
    (step2 / "extra_rank0.pt").write_bytes(b"\x80\x04this is not a pickle")
    _rewrite_manifest_entry(step2, "extra_rank0.pt")
    assert verify_checkpoint(step2) is None
    with caplog.at_level(logging.WARNING, logger="singleturn.trainer.checkpoint"):
        extra, _ = _load(tmp_path)
    assert extra["step"] == 1, f"loaded {extra}"
    assert any(
        str(step2) in r.getMessage() and "extra_rank0.pt does not unpickle" in r.getMessage()
        for r in caplog.records
    ), caplog.text


def test_all_checkpoints_corrupt_is_an_error_naming_each(tmp_path):
    _train_and_save(tmp_path)
    root = tmp_path / "checkpoints"
    shard1 = root / "step_1" / "shard_rank0.safetensors"
    _flip(shard1, _safetensors_data_start(shard1) + 8)
    (root / "step_2" / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as err:
        _load(tmp_path)
    msg = str(err.value)
    assert "2 checkpoint(s)" in msg and "none is usable" in msg, msg
    assert f"{root / 'step_1'}: shard_rank0.safetensors checksum mismatch" in msg, msg
    assert f"{root / 'step_2'}: partial: no manifest.json" in msg, msg


def test_no_checkpoint_at_all_returns_none(tmp_path):
    assert _load(tmp_path)[0] is None  # no checkpoints/ directory
    (tmp_path / "checkpoints" / ".tmp_step_1").mkdir(parents=True)  # a first save that never committed
    assert _load(tmp_path)[0] is None


@pytest.mark.parametrize("export", [False, True])
def test_non_finite_parameter_is_never_saved(tmp_path, export):
    _, fsdp, opt = _train_and_save(tmp_path / "run", steps=(1,))
    unit, shard = next(iter(fsdp.sharded_state_dict().items()))
    layout = next(u for u in fsdp.layout()["units"] if u["name"] == unit)
    slot = layout["params"][-1]  # poison the unit's last parameter: its name must be found by offset
    shard[slot["offset"] + 5] = float("nan")
    shard[slot["offset"] + 9] = float("inf")
    want = rf"2 non-finite parameter values \(first: {re.escape(slot['fqns'][0])} element 5\)"
    with pytest.raises(CheckpointError, match=want):
        if export:
            export_final(tmp_path / "final", fsdp, fsdp_worker.build_model(tied=False).config, None)
        else:
            save_checkpoint(tmp_path / "run", 2, fsdp=fsdp, optimizer=opt, extra={})
    assert not (tmp_path / "final").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_1"]


# --- optim.moments_from: a fresh stage's AdamW seeded with another run's moments


def _same_weights_fresh_optimizer(fsdp_src, lr):
    fsdp = apply_fsdp(fsdp_worker.build_model(tied=False))
    fsdp.load_sharded_state_dict({n: t.clone() for n, t in fsdp_src.sharded_state_dict().items()})
    opt = torch.optim.AdamW(fsdp.parameters(), lr=lr, weight_decay=fsdp_worker.WD, betas=(0.9, 0.95))
    return fsdp, opt


def _next_step_shards(fsdp, opt, step):
    fsdp_worker.train_hand(fsdp.model, fsdp, opt, WORLD1, 1, fsdp_worker.loss_hidden, start=step)
    return {n: t.clone() for n, t in fsdp.sharded_state_dict().items()}


@pytest.mark.parametrize("source", ["run_dir", "step_dir"])
def test_moments_from_continue_the_saving_run_at_the_new_lr(tmp_path, source):
    """A fresh AdamW over run A's final weights, seeded by load_moments, keeps its own lr and takes
    exactly the step A would take next at that lr; a fresh AdamW without the moments does not."""
    _, fsdp_a, opt_a = _train_and_save(tmp_path / "a", steps=(1, 2))
    listing = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    lr = fsdp_worker.LR / 3
    fsdp_b, opt_b = _same_weights_fresh_optimizer(fsdp_a, lr)
    src = tmp_path / "a" if source == "run_dir" else tmp_path / "a" / "checkpoints" / "step_2"
    got = load_moments(src, fsdp=fsdp_b, optimizer=opt_b)
    assert got == {"path": str(tmp_path / "a" / "checkpoints" / "step_2"), "step": 2}, got
    assert opt_b.param_groups[0]["lr"] == lr, "the new stage's lr must stay"
    for (name, pa), pb in zip(fsdp_a.named_parameters(), fsdp_b.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), f"{name}/{key}"
    for g in opt_a.param_groups:
        g["lr"] = lr
    fsdp_c, opt_c = _same_weights_fresh_optimizer(fsdp_a, lr)  # the control: fresh moments
    want, got_b = _next_step_shards(fsdp_a, opt_a, 2), _next_step_shards(fsdp_b, opt_b, 2)
    fresh = _next_step_shards(fsdp_c, opt_c, 2)
    for name in want:
        assert torch.equal(got_b[name], want[name]), f"{name}: not the saving run's next step"
    assert any(not torch.allclose(fresh[n], want[n]) for n in want), "the control cannot tell moments apart"
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == listing, "source touched"


def test_moments_from_refuses_other_weights_and_missing_state(tmp_path):
    _, fsdp_a, _ = _train_and_save(tmp_path / "a", steps=(1,))
    fsdp_b, opt_b = _same_weights_fresh_optimizer(fsdp_a, fsdp_worker.LR)
    with torch.no_grad():
        fsdp_b.parameters()[0][3] += 1e-6  # one element of other weights
    with pytest.raises(ValueError, match="1 parameter elements of the model differ"):
        load_moments(tmp_path / "a", fsdp=fsdp_b, optimizer=opt_b)
    assert not opt_b.state, "a refused load left optimizer state behind"
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_moments(tmp_path / "nothing-here", fsdp=fsdp_b, optimizer=opt_b)
    # a checkpoint saved before any optimizer step has no moments to give
    fsdp_c, opt_c = _same_weights_fresh_optimizer(fsdp_a, fsdp_worker.LR)
    save_checkpoint(tmp_path / "c", 0, fsdp=fsdp_c, optimizer=opt_c, extra={})
    with pytest.raises(ValueError, match="holds no AdamW state"):
        load_moments(tmp_path / "c", fsdp=fsdp_c, optimizer=opt_c)
    step1 = tmp_path / "a" / "checkpoints" / "step_1"
    shard = step1 / "shard_rank0.safetensors"
    _flip(shard, _safetensors_data_start(shard) + 8)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_moments(step1, fsdp=fsdp_b, optimizer=opt_b)
