"""Write a file so that readers see the old contents or the new, never a part.

A run killed mid-write (or a full disk) used to leave an empty or truncated JSON that stopped every
later resume. The text goes to a temporary name of this process beside the target, is flushed to
disk, and is renamed over the target (`os.replace`, atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_text_atomic"]


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace `path`'s contents with `text` (UTF-8) atomically; returns the path. On failure (e.g.
    no space left) the target is unchanged and the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
