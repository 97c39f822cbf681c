"""Sharded training checkpoints (save, verify, load with resharding) and the final HF export.

Layout of `run_dir/checkpoints/step_N/`:
    shard_rank{r}.safetensors  rank r's fp32 master shard of every unit (`{unit}/param`) and its
                               AdamW state (`{unit}/exp_avg`, `{unit}/exp_avg_sq`, `{unit}/step`)
    extra_rank{r}.pt           rank r's `extra` dict (RNG states, data position, config, ...)
    manifest.json              written last: world size, step, the FSDP flat layout per unit (param
                               names, shapes, offsets, numel, padding), optimizer param groups, and
                               the byte size of every file
A checkpoint is written under `checkpoints/.tmp_step_N/` and renamed to `step_N/` by rank 0 once
every rank has written its files (barrier): a `step_N/` directory is complete by construction.
The run directory must be on a filesystem every rank sees (multi-node: a shared one).

Loading (`load_latest_checkpoint`) walks `step_N/` from the newest, verifies each (manifest
present and parseable, every listed file present with its recorded size, every safetensors
header valid and covering the file), logs and skips a bad one, and loads the first good one.
The flat layout of a unit does not depend on the world size (only the zero padding does), so a
checkpoint written by W ranks loads on W' ranks: each rank reads just the slices of the old shards
that overlap its new range (safetensors `get_slice`), for the parameters and for exp_avg /
exp_avg_sq; the scalar AdamW `step` is the same on every rank. `extra` comes back from the file of
the same rank, or rank 0's when that rank did not exist in the saving run.

API:
    save_checkpoint(run_dir, step, *, fsdp, optimizer, extra, keep_last=3) -> Path
    load_latest_checkpoint(run_dir, *, fsdp, optimizer) -> dict | None   # `extra` (+ "step")
    export_final(out_dir, fsdp, model_config, tokenizer_path) -> Path     # HF format, rank 0 writes
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.dist import barrier, broadcast_object, get_rank, get_world_size, is_main

__all__ = ["save_checkpoint", "load_latest_checkpoint", "export_final", "verify_checkpoint"]

_STEP_RE = re.compile(r"^step_(\d+)$")
_MANIFEST = "manifest.json"
log = logging.getLogger(__name__)  # skips are warnings: printed even when logging is not configured


def _gather_objects(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _optimizer_state(fsdp, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Tensors of the optimizer state per unit + the param groups (hyper-parameters, unit names)."""
    name_of = {id(p): n for n, p in fsdp.named_parameters()}
    tensors, groups = {}, []
    for g in optimizer.param_groups:
        hyper = {k: v for k, v in g.items() if k != "params"}
        groups.append({"units": [name_of[id(p)] for p in g["params"]], **_jsonable(hyper)})
        for p in g["params"]:
            for key, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{name_of[id(p)]}/{key}"] = v.detach().to("cpu").contiguous()
    return tensors, groups


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, torch.Tensor):
            v = v.item()
        if v is None or isinstance(v, (bool, int, float, str, list)):
            out[k] = v
    return out


def save_checkpoint(run_dir, step: int, *, fsdp, optimizer, extra: dict, keep_last: int = 3) -> Path:
    """Write `run_dir/checkpoints/step_{step}/` (collective: every rank calls it); keep the newest
    `keep_last` complete checkpoints. `extra` is this rank's picklable dict. Returns the path."""
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp_step_{step}", root / f"step_{step}"
    rank, world = get_rank(), get_world_size()
    if is_main():
        if tmp.exists():
            shutil.rmtree(tmp)  # a leftover of a crashed save of the same step
        tmp.mkdir(parents=True)
    barrier()

    tensors = {f"{name}/param": t.to("cpu").contiguous() for name, t in fsdp.sharded_state_dict().items()}
    if optimizer is not None:
        opt_tensors, groups = _optimizer_state(fsdp, optimizer)
        tensors.update(opt_tensors)
    else:
        groups = []
    shard_file, extra_file = f"shard_rank{rank}.safetensors", f"extra_rank{rank}.pt"
    save_file(tensors, str(tmp / shard_file), metadata={"step": str(step), "rank": str(rank)})
    torch.save(extra, tmp / extra_file)
    sizes = {f: (tmp / f).stat().st_size for f in (shard_file, extra_file)}
    all_sizes = _gather_objects(sizes)

    if is_main():
        manifest = {
            "step": step,
            "world_size": world,
            "layout": fsdp.layout(),
            "param_groups": groups,
            "files": {k: v for s in all_sizes for k, v in s.items()},
        }
        with open(tmp / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)  # the commit point
        _prune(root, keep_last)
    barrier()
    return final


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def _prune(root: Path, keep_last: int) -> None:
    for _, p in _complete_steps(root)[keep_last:]:
        shutil.rmtree(p, ignore_errors=True)


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
        except ValueError:
            return "header is not valid JSON"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"data ends at byte {8 + n + end}, file has {size}"
    return None


def verify_checkpoint(path: Path) -> str | None:
    """None when `path` is a complete, loadable checkpoint; otherwise the reason it is not."""
    mf = path / _MANIFEST
    if not mf.is_file():
        return "partial: no manifest.json"
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
        world = manifest["world_size"]
    except (ValueError, KeyError) as e:
        return f"manifest.json unreadable ({e})"
    for r in range(world):
        for f in (f"shard_rank{r}.safetensors", f"extra_rank{r}.pt"):
            if f not in files:
                return f"manifest lists no {f}"
    for f, expected in files.items():
        p = path / f
        if not p.is_file():
            return f"missing {f}"
        if p.stat().st_size != expected:
            return f"{f} truncated or altered ({p.stat().st_size} bytes, manifest says {expected})"
        if f.endswith(".safetensors") and (why := _safetensors_ok(p)):
            return f"{f}: {why}"
    return None


def _find_latest(root: Path) -> Path | None:
    for tmp in sorted(root.glob(".tmp_step_*")):
        log.warning(f"skipping partial checkpoint {tmp} (never completed: still under its temporary name)")
    for _, path in _complete_steps(root):
        why = verify_checkpoint(path)
        if why is None:
            return path
        log.warning(f"skipping checkpoint {path}: {why}")
    return None


def _read_range(path: Path, old: dict, key: str, lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of a unit's flat tensor `key` ("param", "exp_avg", ...) saved by
    old["world_size"] ranks; positions past the unpadded numel are zeros (padding)."""
    S, numel = old["shard_numel"], old["numel"]
    out = torch.zeros(hi - lo, dtype=torch.float32)
    for r in range(lo // S, min(-(-min(hi, numel) // S), old["world_size"])):
        a, b = max(lo, r * S), min(hi, (r + 1) * S, numel)
        if a >= b:
            continue
        with safe_open(str(path / f"shard_rank{r}.safetensors"), framework="pt") as f:
            out[a - lo : b - lo] = f.get_slice(f"{old['name']}/{key}")[a - r * S : b - r * S]
    return out


def load_latest_checkpoint(run_dir, *, fsdp, optimizer) -> dict | None:
    """Load the newest complete checkpoint into `fsdp` (and `optimizer`, if given) on every rank;
    reshards when the world size changed. Returns this rank's `extra` dict with "step" added, or
    None when there is no loadable checkpoint (collective)."""
    root = Path(run_dir) / "checkpoints"
    path = _find_latest(root) if is_main() and root.is_dir() else None
    path = broadcast_object(str(path) if path else None)
    if path is None:
        return None
    path = Path(path)
    manifest = json.loads((path / _MANIFEST).read_text())
    old_units = {u["name"]: u | {"world_size": manifest["world_size"]} for u in manifest["layout"]["units"]}
    new_layout = fsdp.layout()
    rank = get_rank()
    resharded = manifest["world_size"] != new_layout["world_size"]
    log.info(
        f"loading {path} (saved by {manifest['world_size']} ranks, loading on {new_layout['world_size']})"
    )

    shards, opt_state = {}, {}
    with safe_open(str(path / "shard_rank0.safetensors"), framework="pt") as f0:
        saved_keys = set(f0.keys())
        for unit in new_layout["units"]:
            name = unit["name"]
            old = old_units.get(name)
            if old is None or _slots(old) != _slots(unit):
                raise ValueError(f"checkpoint {path}: unit {name} has a different parameter layout")
            S = unit["shard_numel"]
            lo, hi = rank * S, (rank + 1) * S
            shards[name] = _read_range(path, old, "param", lo, hi)
            state = {}
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if f"{name}/{key}" in saved_keys:
                    state[key] = _read_range(path, old, key, lo, hi)
            if f"{name}/step" in saved_keys:
                state["step"] = f0.get_tensor(f"{name}/step")  # identical on every rank
            if state:
                opt_state[name] = state
    fsdp.load_sharded_state_dict({n: t.to(fsdp.device) for n, t in shards.items()})
    if optimizer is not None and manifest["param_groups"]:
        _load_optimizer(optimizer, fsdp, manifest["param_groups"], opt_state)

    src = rank if rank < manifest["world_size"] else 0
    extra = torch.load(path / f"extra_rank{src}.pt", weights_only=False)
    if resharded and rank >= manifest["world_size"]:
        log.info(f"rank {rank} did not exist in the saving run: it gets rank 0's extra state")
    return {**extra, "step": manifest["step"]}


def _slots(unit: dict) -> list:
    return [(tuple(s["fqns"]), tuple(s["shape"]), s["offset"]) for s in unit["params"]]


def _load_optimizer(optimizer, fsdp, saved_groups: list[dict], opt_state: dict) -> None:
    """Rebuild `optimizer.state_dict()` from per-unit tensors and the saved hyper-parameters."""
    params = dict(fsdp.named_parameters())
    index = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            index[id(p)] = len(index)
    sd = optimizer.state_dict()
    if len(saved_groups) != len(sd["param_groups"]):
        raise ValueError(
            f"checkpoint has {len(saved_groups)} optimizer param groups, the optimizer {len(sd['param_groups'])}"
        )
    for cur, saved in zip(sd["param_groups"], saved_groups):
        cur.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "units"})
        cur["params"] = [index[id(params[n])] for n in saved["units"]]
    sd["state"] = {index[id(params[n])]: st for n, st in opt_state.items()}
    optimizer.load_state_dict(sd)  # casts exp_avg / exp_avg_sq to each param's device and dtype


def export_final(out_dir, fsdp, model_config, tokenizer_path) -> Path:
    """Write consolidated HF safetensors + config.json (+ tokenizer.json when `tokenizer_path` is
    given) to `out_dir` (collective; rank 0 writes). Loadable by `model.load_hf_checkpoint` and by
    `transformers.LlamaForCausalLM.from_pretrained`."""
    from model.hf_io import save_hf_checkpoint
    from model.transformer import Transformer

    out_dir = Path(out_dir)
    state = fsdp.full_state_dict(rank0_only=True)
    if is_main():
        with torch.device("meta"):
            model = Transformer(model_config)
        model.load_state_dict(state, assign=True)
        model.tie_weights()
        save_hf_checkpoint(model, out_dir)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
    barrier()
    return out_dir
