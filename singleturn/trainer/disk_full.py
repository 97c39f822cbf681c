"""A full filesystem as one clear error instead of a raw writer exception.

Writers report a full disk in different ways: Python's file objects raise OSError with errno ENOSPC
(or EDQUOT for an exceeded quota); safetensors' Rust writer raises `SafetensorError("Error while
serializing: I/O error: No space left on device (os error 28)")`; `torch.save` straight to a file
fails with an unrelated zip-writer message ("unexpected pos ..."), which is why the checkpoint writes
its small pickles to memory first and the bytes through a Python file object.

`DiskFullError` is what the trainer raises (trainer/checkpoint.py words it: the directory, the
bytes needed, what was kept, a remedy that works); `trainer/main.py` turns it, and any other write
that `is_disk_full`, into one `disk full error: ...` line and exit code 5.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from shutil import disk_usage

import torch

__all__ = ["DiskFullError", "is_disk_full", "fmt_bytes", "no_room_message", "pickled", "write_bytes"]

_CODES = (errno.ENOSPC, errno.EDQUOT)
# How the Rust standard library (safetensors) and C libraries word these errors.
_PHRASES = tuple(f"os error {c}" for c in _CODES) + tuple(os.strerror(c) for c in _CODES)


class DiskFullError(RuntimeError):
    """A write failed because its filesystem is full or over quota; nothing half-written is left
    where a later run would read it."""


def is_disk_full(e: BaseException) -> bool:
    """True when `e` (or an exception it was raised from) reports ENOSPC or EDQUOT."""
    while e is not None:
        if isinstance(e, DiskFullError):
            return True
        if isinstance(e, OSError) and e.errno in _CODES:
            return True
        if any(p in str(e) for p in _PHRASES):
            return True
        e = e.__cause__ or e.__context__
    return False


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal)."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def pickled(obj) -> bytes:
    """`torch.save(obj)` to memory: written to a full disk directly, torch.save fails with an
    unrelated message ("unexpected pos ...")."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write `data` to `path` through a Python file object (a full disk raises OSError ENOSPC)."""
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def no_room_message(root: Path, what: str, need: int, kept: list[Path]) -> str:
    """One line for a save of `what` (about `need` bytes) that found no room under `root`, where
    `kept` are the complete checkpoints left, newest first: what is free, what is intact and a
    remedy that works (a checkpoint save prunes to keep_last - 1 before writing, never the newest)."""
    free = disk_usage(root).free
    missing = need - free
    free_more = (
        f"free at least {fmt_bytes(missing)} there"
        if missing > 0
        else "free space there (or raise the quota)"
    )
    msg = (
        f"no space left on the filesystem of {root} to write {what} (needs about {fmt_bytes(need)}, "
        f"{fmt_bytes(free)} free); the partial write was removed"
    )
    if not kept:
        return f"{msg}; {free_more}, then run again"
    msg += f", {kept[0].name} and any older checkpoints are intact"
    if len(kept) == 1:
        return f"{msg}; {free_more} (the newest checkpoint is never deleted to make room), then --resume"
    older = sum(f.stat().st_size for p in kept[1:] for f in p.iterdir() if f.is_file())
    remedy = (
        f"; run again with --resume --checkpoint.keep_last=2 (each save then first deletes all but the "
        f"newest checkpoint: here {len(kept) - 1} older, {fmt_bytes(older)})"
    )
    return msg + remedy + (f" and free {fmt_bytes(missing - older)} more there" if missing > older else "")
