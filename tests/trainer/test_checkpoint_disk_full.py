"""A full disk during a checkpoint save (issue 23, fault 7): one clear error naming the directory,
the bytes needed and a remedy that works; no partial checkpoint left behind; the last good
checkpoint still loads; and with keep_last = K the save prunes to K - 1 (never the newest) before
writing, so lowering keep_last, the remedy, lets the next save fit.

The filesystem is faked at the checkpoint's two writers (safetensors' `save_file` and the Python
file writes of the pickled `extra` and the manifest): a write that does not fit in the quota writes
what fits, then fails as the real writers do on a full disk (checked on a 1 MiB tmpfs: safetensors
raises `SafetensorError('... No space left on device (os error 28)')`, a Python file OSError ENOSPC).
"""

import errno
import gc
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import fsdp_worker
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes
from test_resume import tiny_args

import singleturn.trainer.checkpoint as ckpt
import singleturn.trainer.disk_full as disk_full
from singleturn.trainer.checkpoint import (
    DiskFullError,
    load_latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from singleturn.trainer.dist import DistInfo
from singleturn.trainer.fsdp import apply_fsdp

WORLD1 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
_ENOSPC_RUST = "Error while serializing: I/O error: No space left on device (os error 28)"


class _Quota:
    """`room` more bytes of files under `root` than there are now, enforced at the checkpoint's
    writers (and reported by the free-space query the error message makes)."""

    def __init__(self, monkeypatch, root: Path, room: int):
        self.root = root
        self.limit = self.used() + room
        monkeypatch.setattr(ckpt, "save_file", self.save_file)
        monkeypatch.setattr(ckpt, "write_bytes", self.write_bytes)
        monkeypatch.setattr(disk_full, "disk_usage", lambda path: SimpleNamespace(free=self.free()))

    def used(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def free(self) -> int:
        return max(self.limit - self.used(), 0)

    def _write(self, path, data: bytes, error: Exception) -> None:
        room = self.free()
        Path(path).write_bytes(data[:room])
        if len(data) > room:
            raise error

    def save_file(self, tensors, filename, metadata=None):
        self._write(filename, safetensors_bytes(tensors, metadata=metadata), SafetensorError(_ENOSPC_RUST))

    def write_bytes(self, path, data, fsync=False):
        self._write(path, data, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)))


def _two_checkpoints(run_dir):
    """Steps 1 and 2 saved (one AdamW step each); returns fsdp, optimizer and the step-2 shards."""
    model = fsdp_worker.build_model(tied=False)
    fsdp = apply_fsdp(model)
    opt = fsdp_worker.make_opt(fsdp.parameters())
    for s in (1, 2):
        fsdp_worker.train_hand(model, fsdp, opt, WORLD1, 1, fsdp_worker.loss_hidden, start=s - 1)
        save_checkpoint(run_dir, s, fsdp=fsdp, optimizer=opt, extra={"tag": f"step{s}"})
    return fsdp, opt, {n: t.clone() for n, t in fsdp.sharded_state_dict().items()}


def _sizes(ckpt_dir: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in ckpt_dir.iterdir()}


def _assert_step2_intact(run_dir, shards) -> None:
    root = run_dir / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step_1", "step_2"], f"{names}: a partial checkpoint was left, or a good one deleted"
    fsdp = apply_fsdp(fsdp_worker.build_model(tied=False))
    extra = load_latest_checkpoint(run_dir, fsdp=fsdp, optimizer=fsdp_worker.make_opt(fsdp.parameters()))
    assert (extra["step"], extra["tag"]) == (2, "step2"), f"loaded {extra}"
    for name, t in fsdp.sharded_state_dict().items():
        assert torch.equal(t, shards[name]), f"{name}: not the step-2 weights"


@pytest.mark.parametrize("fails_at", ["shard_rank0.safetensors", "extra_rank0.pt", "manifest.json"])
def test_full_disk_is_one_clear_error_and_the_last_checkpoint_still_loads(tmp_path, monkeypatch, fails_at):
    fsdp, opt, shards = _two_checkpoints(tmp_path)
    sizes = _sizes(tmp_path / "checkpoints" / "step_2")  # step 3's files have the same sizes
    order = ["shard_rank0.safetensors", "extra_rank0.pt", "manifest.json"]
    room = sum(sizes[f] for f in order[: order.index(fails_at)]) + sizes[fails_at] // 2
    _Quota(monkeypatch, tmp_path, room)
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(tmp_path, 3, fsdp=fsdp, optimizer=opt, extra={"tag": "step3"}, keep_last=3)
    msg, root = str(err.value), tmp_path / "checkpoints"
    assert "\n" not in msg, msg
    assert f"no space left on the filesystem of {root} to write checkpoint step_3 (needs about" in msg, msg
    assert "step_2 and any older checkpoints are intact" in msg, msg
    assert "--resume --checkpoint.keep_last=2" in msg, msg
    _assert_step2_intact(tmp_path, shards)


def test_lowering_keep_last_makes_room_before_writing(tmp_path, monkeypatch):
    """The remedy of the error above: the same quota, keep_last 3 fails, keep_last 2 fits (step_1 is
    deleted before step_3 is written); a leftover .tmp_step_* of a killed save is removed as well."""
    fsdp, opt, _ = _two_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    (root / ".tmp_step_9").mkdir()
    (root / ".tmp_step_9" / "shard_rank0.safetensors").write_bytes(b"\0" * 4096)  # a killed save's
    one = sum(_sizes(root / "step_2").values())
    _Quota(monkeypatch, tmp_path, one // 2 - 4096)  # half a checkpoint free once the leftover is gone
    with pytest.raises(DiskFullError, match="keep_last=2"):
        save_checkpoint(tmp_path, 3, fsdp=fsdp, optimizer=opt, extra={"tag": "step3"}, keep_last=3)
    save_checkpoint(tmp_path, 3, fsdp=fsdp, optimizer=opt, extra={"tag": "step3"}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3"]
    assert verify_checkpoint(root / "step_3") is None, verify_checkpoint(root / "step_3")


def test_the_newest_checkpoint_is_never_deleted_to_make_room(tmp_path, monkeypatch):
    """keep_last=1 and no room for a second checkpoint: step_2 stays; the remedy is freeing space."""
    fsdp, opt, shards = _two_checkpoints(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step_1")  # as a keep_last=1 run holds them
    _Quota(monkeypatch, tmp_path, 100)
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(tmp_path, 3, fsdp=fsdp, optimizer=opt, extra={"tag": "step3"}, keep_last=1)
    msg = str(err.value)
    assert "step_2 and any older checkpoints are intact; free at least" in msg, msg
    assert "never deleted to make room), then --resume" in msg, msg
    fsdp2 = apply_fsdp(fsdp_worker.build_model(tied=False))
    extra = load_latest_checkpoint(tmp_path, fsdp=fsdp2, optimizer=None)
    assert extra["step"] == 2 and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]
    for name, t in fsdp2.sharded_state_dict().items():
        assert torch.equal(t, shards[name]), name


def test_trainer_exits_5_with_one_line(tmp_path, monkeypatch, capsys):
    """The whole trainer (in this process, world size 1): a full disk at the first checkpoint is
    `disk full error: ...` on one line and exit code 5, no traceback, no .tmp_step_1 left."""
    from singleturn.trainer.main import main
    from singleturn.trainer.synthetic import write_synthetic_inputs

    states, tok = write_synthetic_inputs(tmp_path)
    args = tiny_args(tmp_path, states, tok, "full-disk") + ["--checkpoint.every=1", "--sft.steps=2"]
    _Quota(monkeypatch, tmp_path / "runs", 0)  # no room for checkpoints (other files are not limited)
    assert main(args) == 5
    err = capsys.readouterr().err.strip().splitlines()
    root = tmp_path / "runs" / "full-disk" / "checkpoints"
    assert len(err) == 1 and err[0].startswith(
        f"disk full error: no space left on the filesystem of {root}"
    ), err
    assert "; free at least" in err[0] and "then run again" in err[0], err
    assert list(root.iterdir()) == [], "the partial checkpoint was left behind"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_a_loaded_checkpoint_is_not_kept_mapped(tmp_path):
    """After a resume, the loaded checkpoint is pruned by later saves: a tensor still backed by its
    file (safetensors maps it) would keep the space taken until the process exits, and the full
    disk the pruning was for would stay full."""
    _two_checkpoints(tmp_path)
    fsdp = apply_fsdp(fsdp_worker.build_model(tied=False))
    opt = fsdp_worker.make_opt(fsdp.parameters())
    assert load_latest_checkpoint(tmp_path, fsdp=fsdp, optimizer=opt)["step"] == 2
    gc.collect()
    mapped = [
        line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if str(tmp_path) in line
    ]
    assert not mapped, f"still mapped after loading: {mapped}"
