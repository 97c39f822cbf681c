"""The on-disk format of a training checkpoint and its single-process verification.

Layout of `run_dir/checkpoints/step_N/`:
    shard_rank{r}.safetensors  rank r's fp32 master shard of every unit (`{unit}/param`) and its
                               AdamW state (`{unit}/exp_avg`, `{unit}/exp_avg_sq`, `{unit}/step`)
    extra_rank{r}.pt           rank r's `extra` dict (RNG states, data position, config, ...)
    manifest.json              written last: format, world size, step, the FSDP flat layout per unit
                               (param names, shapes, offsets, numel, padding), optimizer param groups,
                               every file's byte size and crc32, and a crc32 of the manifest itself

Checksums: zlib.crc32 over each file in 8 MiB chunks (each rank hashes the two files it wrote, at
save, reading them back from the page cache). crc32 guards against the corruption that keeps a
file's size (flipped bits on disk, a torn page), not against tampering. In CPython on this 2-core
VM, crc32 ran at 1.2-2.8 GB/s, adler32 0.9-2.1, sha1 1.0-1.4, sha256 0.7-1.3, blake2b 0.3-0.5
(ranges over runs: other jobs shared the cores). Measured cost (bench/bench_checkpoint_hash.py ->
bench/results/checkpoint_hash.md) on the 1B preset's whole checkpoint, 1.24B params x (fp32 param
+ AdamW exp_avg + exp_avg_sq) = 14.8 GB as one file (world size 1): `file_crc32` 19.4 s
(0.76 GB/s, page cache warm; 14.9 s in a quieter earlier run) against 64 s (43 s) to write the
file with fsync and 7.7 s (4.0 s) to read it without hashing. The cost is split over the ranks:
each hashes its own file at save and 1/W of the files at load, so 8 ranks hash 1.9 GB (~2.4 s) each.

`verify_checkpoint(path)` checks a directory without a process group: the manifest present,
parseable and matching its own checksum; every listed file present with its recorded size and
crc32; every safetensors header valid and covering the file. Saving, collective verification and
loading with resharding: trainer/checkpoint.py.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

__all__ = ["CheckpointError", "file_crc32", "verify_checkpoint"]

STEP_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
FORMAT = 2  # 2: per-file {"bytes", "crc32"} + the manifest's own checksum; before: byte sizes only
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that must not be written (non-finite parameters) or checkpoints that exist but
    none of which can be loaded: the run stops rather than poison or silently restart itself."""


def file_crc32(path) -> str:
    """zlib.crc32 of a file's bytes as 8 hex digits (8 MiB chunks read into one reused buffer)."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)  # releases the GIL on large buffers
    return f"{crc:08x}"


def manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def _safetensors_ok(path: Path) -> str | None:
    """None if the header parses and its tensors end exactly at the end of the file, else why not."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return "shorter than a safetensors header"
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            return "header runs past the end of the file"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "header is not valid JSON"
    if 8 + n + end != size:
        return f"data ends at byte {8 + n + end}, file has {size}"
    return None


def read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when manifest.json parses, matches its checksum and lists every rank's
    files; else (None, why not)."""
    mf = path / MANIFEST
    if not mf.is_file():
        return None, "partial: no manifest.json"
    try:
        manifest = json.loads(mf.read_text())
        files, world = manifest["files"], manifest["world_size"]
        if not isinstance(files, dict) or not isinstance(world, int):
            raise ValueError("'files' is not a table or 'world_size' not an int")
    except (OSError, ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        return None, f"manifest.json unreadable ({type(e).__name__}: {e})"
    if not all(isinstance(e, dict) and {"bytes", "crc32"} <= e.keys() for e in files.values()):
        return None, "manifest.json lists a file without its bytes and crc32 (not written by this version)"
    if manifest.get("checksum") != manifest_checksum(manifest):
        return None, (
            f"manifest.json checksum mismatch (crc32 {manifest_checksum(manifest)}, "
            f"recorded {manifest.get('checksum')}): altered after it was written"
        )
    for r in range(world):
        for f in (f"shard_rank{r}.safetensors", f"extra_rank{r}.pt"):
            if f not in files:
                return None, f"manifest lists no {f}"
    return manifest, None


def file_problem(path: Path, name: str, entry) -> str | None:
    """None when `path/name` matches its manifest entry ({"bytes", "crc32"}), else why not."""
    size, crc = entry["bytes"], entry["crc32"]
    p = path / name
    try:
        if not p.is_file():
            return f"missing {name}"
        got = p.stat().st_size
        if got != size:
            return f"{name} truncated or altered ({got} bytes, manifest says {size})"
        if name.endswith(".safetensors") and (why := _safetensors_ok(p)):
            return f"{name}: {why}"
        if (got_crc := file_crc32(p)) != crc:
            return f"{name} checksum mismatch (crc32 {got_crc}, manifest says {crc}): corrupted on disk"
    except OSError as e:
        return f"{name} unreadable ({e})"
    return None


def verify_checkpoint(path: Path) -> str | None:
    """None when `path` is a complete, intact checkpoint (manifest, sizes, checksums, safetensors
    headers); otherwise the reason it is not. Reads every file (single process)."""
    path = Path(path)
    manifest, why = read_manifest(path)
    if why:
        return why
    problems = [p for f, e in sorted(manifest["files"].items()) if (p := file_problem(path, f, e))]
    return "; ".join(problems) or None
