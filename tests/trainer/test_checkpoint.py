"""Sharded checkpoints (trainer/checkpoint.py): resume, resharding 2 <-> 1 ranks, corrupt/partial, keep_last.

The fixture runs three worker phases once for the module (see tests/trainer/fsdp_worker.py):
world 1 in this process (uninterrupted reference losses + a world-1 checkpoint at step 2), ONE
`torchrun --nproc_per_node=2` (2-rank save/continue, 1 -> 2 resume, corrupt/partial/keep_last) and
world 1 in this process again, resuming the 2-rank checkpoint (2 -> 1). Resumed runs must reproduce the
uninterrupted losses (1e-6 relative: 1 and 2 ranks sum the loss in a different order).
The resharding arithmetic with zero padding (numel not divisible by the world size) is tested
directly below on hand-made shard files.
"""

import json

import fsdp_worker
import pytest
import torch
from safetensors.torch import save_file
from test_fsdp import assert_losses_equal, run_worker

from trainer.checkpoint import _read_range, verify_checkpoint
from trainer.dist import DistInfo


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
    files = {f.name: f.stat().st_size for f in tmp_path.iterdir()}
    (tmp_path / "manifest.json").write_text(json.dumps({"world_size": 1, "files": files}))
    assert verify_checkpoint(tmp_path) is None
    shard = tmp_path / "shard_rank0.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8] = ord("x")  # same size, broken JSON header
    shard.write_bytes(bytes(raw))
    assert "header" in verify_checkpoint(tmp_path)
