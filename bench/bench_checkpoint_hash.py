"""Cost of the checkpoint checksums (trainer/checkpoint.py `file_crc32`) at the 1B preset's size.

The 1B preset's whole sharded checkpoint is ~1.24B parameters x 12 bytes (fp32 master weights +
AdamW exp_avg + exp_avg_sq) = 14.8 GB; at world size 1 it is one shard file, at W ranks W files of
1/W of it (each rank hashes its own at save, 1/W of the files at load). This script writes one
synthetic file of that size (random bytes: crc32's speed does not depend on the content), then
times: the write itself (what a save costs anyway), a plain chunked read (the I/O floor), and
`file_crc32` (the added cost: right after the write the file is in the page cache, as it is when
`save_checkpoint` hashes it). It also compares hash functions on an in-memory buffer, the reason for
crc32. Cold-cache reads (a resume after a reboot) are disk-bound and not measured here.

    python bench/bench_checkpoint_hash.py                 # 14.8 GB file under runs/bench/
    python bench/bench_checkpoint_hash.py --quick         # 1 GiB
    python bench/bench_checkpoint_hash.py --cpu-smoke     # 64 MiB
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from pathlib import Path

from _common import REPO, base_parser, env_info, time_ms, write_jsonl, write_markdown

from singleturn.trainer.checkpoint import file_crc32

PRESET_1B_PARAMS = 1_235_814_400  # sum of numel of Transformer(PRESETS["llama3.2-1b"])
BYTES_PER_PARAM = 12  # fp32 param + exp_avg + exp_avg_sq
TOPIC = "checkpoint_hash"


def _write(path: Path, nbytes: int) -> None:
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())  # the write is really on disk before it is timed as done


def _read(path: Path) -> None:
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _in_memory_rows(env: dict) -> list[dict]:
    buf = memoryview(os.urandom(256 << 20))
    algos = {
        "crc32": lambda: zlib.crc32(buf),
        "adler32": lambda: zlib.adler32(buf),
        "sha1": lambda: hashlib.sha1(buf).digest(),
        "sha256": lambda: hashlib.sha256(buf).digest(),
        "blake2b": lambda: hashlib.blake2b(buf).digest(),
    }
    rows = []
    for name, fn in algos.items():
        t = time_ms(fn, warmup_ms=0, rep_ms=0)
        rows.append({**env, "what": f"in-memory {name}", "bytes": len(buf), **t} | _rate(len(buf), t))
    return rows


def _rate(nbytes: int, t: dict) -> dict:
    return {"GB_s": nbytes / t["ms_median"] / 1e6, "s_median": t["ms_median"] / 1e3}


def _summary(rows: list[dict], nbytes: int) -> str:
    by = {r["what"]: r for r in rows}
    crc, write = by["file_crc32"]["s_median"], by["write + fsync (once)"]["s_median"]
    full = PRESET_1B_PARAMS * BYTES_PER_PARAM
    what = (
        "the 1B preset's whole checkpoint"
        if nbytes == full
        else f"{nbytes / 2**20:.0f} MiB (not the 1B size)"
    )
    return (
        f"\n{what}, {nbytes / 1e9:.2f} GB as one file: `file_crc32` {crc:.1f} s "
        f"({nbytes / crc / 1e9:.2f} GB/s, page cache warm) against {write:.1f} s to write it. At W ranks each "
        f"rank hashes 1/W of it at save and at load (8 ranks: {nbytes / 8 / 1e9:.2f} GB, "
        f"~{crc / 8:.1f} s each).\n"
    )


def main() -> None:
    args = base_parser(__doc__.split("\n")[0]).parse_args()
    nbytes = PRESET_1B_PARAMS * BYTES_PER_PARAM
    if args.quick:
        nbytes = 1 << 30
    if args.cpu_smoke:
        nbytes = 64 << 20
    env = env_info()
    work = REPO / "runs" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "checkpoint_hash.bin"
    rows = []
    try:
        t0 = time.perf_counter()
        _write(path, nbytes)
        write_s = time.perf_counter() - t0
        rows.append(
            {
                **env,
                "what": "write + fsync (once)",
                "bytes": nbytes,
                "s_median": write_s,
                "GB_s": nbytes / write_s / 1e9,
            }
        )
        for what, fn in (
            ("read 8 MiB chunks", lambda: _read(path)),
            ("file_crc32", lambda: file_crc32(path)),
        ):
            t = time_ms(fn, warmup_ms=0, rep_ms=0)  # 3 timed reps after 2 untimed calls
            rows.append({**env, "what": what, "bytes": nbytes, **t} | _rate(nbytes, t))
    finally:
        path.unlink(missing_ok=True)
    rows += _in_memory_rows(env)
    write_jsonl(args.out_dir, TOPIC, rows)
    cols = [
        ("what", "what"),
        ("bytes", "bytes"),
        ("s_median", "s (median)"),
        ("ms_p20", "p20 ms"),
        ("ms_p80", "p80 ms"),
        ("GB_s", "GB/s"),
    ]
    md = write_markdown(args.out_dir, TOPIC, "Checkpoint checksum cost (trainer/checkpoint.py)", rows, cols)
    with open(md, "a") as f:
        f.write(_summary(rows, nbytes))
    for r in rows:
        print(f"{r['what']:24s} {r['bytes'] / 1e9:7.2f} GB  {r['s_median']:8.3f} s  {r['GB_s']:6.2f} GB/s")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
