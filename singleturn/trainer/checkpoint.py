"""Sharded training checkpoints: save, verify, load with resharding (collective), and the final HF
export. The files and their checksums: trainer/checkpoint_format.py.

A checkpoint is written under `checkpoints/.tmp_step_N/` and renamed to `step_N/` by rank 0 once
every rank has written its files (barrier): a `step_N/` directory is complete by construction.
Room is made first: rank 0 deletes `.tmp_step_*` leftovers and prunes to the newest keep_last - 1
complete checkpoints (at least one: the newest is never deleted), so a save needs room for one new
checkpoint, and lowering keep_last cures a full disk. A write that fails on any rank is known to
every rank (gathered) and rank 0 removes the temporary directory; a full disk raises `DiskFullError`
on every rank (one line: the directory, bytes needed and free, what is intact, a remedy that works).
The run directory must be on a filesystem every rank sees (multi-node: a shared one).
A checkpoint never holds a non-finite parameter: `save_checkpoint` and `export_final` refuse
(`CheckpointError`, with the count and the first offending parameter) before writing anything.

Loading (`load_latest_checkpoint`) walks `step_N/` from the newest and verifies each (manifest,
sizes, crc32s, safetensors headers, the files split over the ranks; every rank's `extra` unpickles),
logs and skips a bad one with its path and reason, and loads the first good one; the skipped
(newer) ones are renamed to `step_N.corrupt`, so pruning never keeps them over new saves. When
checkpoints exist but none is usable it raises `CheckpointError` listing each and why, so a resumed
run stops instead of silently starting over; it returns None only when there is no checkpoint.
The flat layout of a unit does not depend on the world size (only the zero padding does), so a
checkpoint written by W ranks loads on W' ranks: each rank reads just the slices of the old shards
that overlap its new range (safetensors `get_slice`), for the parameters and for exp_avg /
exp_avg_sq; the scalar AdamW `step` is the same on every rank. `extra` comes back from the file of
the same rank, or rank 0's when that rank did not exist in the saving run.

API:
    save_checkpoint(run_dir, step, *, fsdp, optimizer, extra, keep_last=3) -> Path
    load_latest_checkpoint(run_dir, *, fsdp, optimizer) -> dict | None   # `extra` (+ "step")
    load_moments(source, *, fsdp, optimizer) -> dict                      # another run's AdamW state
    verify_checkpoint(path) -> str | None                                 # None: loadable
    export_final(out_dir, fsdp, model_config, tokenizer_path) -> Path     # HF format, rank 0 writes
    file_crc32(path) -> str
    CheckpointError, DiskFullError (trainer/disk_full.py)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from singleturn.model.hf_io import save_hf_checkpoint
from singleturn.model.transformer import Transformer
from singleturn.trainer.checkpoint_format import (
    FORMAT,
    MANIFEST,
    CheckpointError,
    complete_steps,
    file_crc32,
    file_problem,
    manifest_checksum,
    read_manifest,
    verify_checkpoint,
)
from singleturn.trainer.disk_full import DiskFullError, is_disk_full, no_room_message, pickled, write_bytes
from singleturn.trainer.dist import (
    all_reduce_sum,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    is_main,
)

__all__ = [
    "CheckpointError",
    "DiskFullError",
    "save_checkpoint",
    "load_latest_checkpoint",
    "export_final",
    "verify_checkpoint",
    "file_crc32",
]

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


def _nonfinite_parameters(fsdp) -> str | None:
    """None when every master shard is finite on every rank, else '<count> non-finite parameter
    values (first: <param fqn> element <i>)' (collective: every rank gets the same answer)."""
    shards = fsdp.sharded_state_dict()
    counts = torch.stack([(~torch.isfinite(t)).sum() for t in shards.values()]).tolist()  # one host sync
    first = None
    if any(counts):
        units = {u["name"]: u for u in fsdp.layout()["units"]}
        name = next(n for n, c in zip(shards, counts) if c)
        unit = units[name]
        local = int(torch.nonzero(~torch.isfinite(shards[name]))[0, 0])
        flat = get_rank() * unit["shard_numel"] + local  # index in the unit's unsharded flat tensor
        slot = next((s for s in unit["params"] if s["offset"] <= flat < s["offset"] + s["numel"]), None)
        first = f"{slot['fqns'][0]} element {flat - slot['offset']}" if slot else f"{name} padding"
    found = _gather_objects((sum(counts), first))
    total = sum(c for c, _ in found)
    if not total:
        return None
    return f"{total} non-finite parameter values (first: {next(f for _, f in found if f)})"


def save_checkpoint(run_dir, step: int, *, fsdp, optimizer, extra: dict, keep_last: int = 3) -> Path:
    """Write `run_dir/checkpoints/step_{step}/` (collective: every rank calls it); keep the newest
    `keep_last` complete checkpoints. `extra` is this rank's picklable dict. Returns the path.
    Older checkpoints are pruned to keep_last - 1 (never the newest) *before* writing, so a save needs
    room for one new checkpoint only. Raises CheckpointError, before writing anything, when a
    parameter is non-finite; DiskFullError when the filesystem is full (the partial checkpoint is
    removed, the older ones stay loadable)."""
    if why := _nonfinite_parameters(fsdp):
        raise CheckpointError(f"refusing to save checkpoint step_{step}: {why}; earlier checkpoints kept")
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp_step_{step}", root / f"step_{step}"
    rank, world = get_rank(), get_world_size()
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        _make_room(root, keep_last)
        tmp.mkdir()
    barrier()

    tensors = {f"{name}/param": t.to("cpu").contiguous() for name, t in fsdp.sharded_state_dict().items()}
    if optimizer is not None:
        opt_tensors, groups = _optimizer_state(fsdp, optimizer)
        tensors.update(opt_tensors)
    else:
        groups = []
    files, failure, need = _write_rank_files(tmp, step, rank, tensors, extra)
    written = _gather_objects((files, need, _describe(failure)))
    need = sum(n for _, n, _ in written)
    problems = [(r, f) for r, (_, _, f) in enumerate(written) if f]

    if is_main() and not problems:
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": world,
            "layout": fsdp.layout(),
            "param_groups": groups,
            "files": {k: v for s, _, _ in written for k, v in s.items()},
        }
        manifest["checksum"] = manifest_checksum(manifest)
        try:
            write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode(), fsync=True)
            if final.exists():  # re-saving a step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)  # the commit point
        except Exception as e:
            failure = e
            problems = [(rank, _describe(e))]
        else:
            _prune(root, keep_last)
    problems = broadcast_object(problems)
    if problems:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # never loaded, but it holds the space
        barrier()
        _raise_save_failure(root, step, need, problems, failure)
    return final


def _write_rank_files(tmp: Path, step: int, rank: int, tensors: dict, extra: dict):
    """Write this rank's shard and extra files into `tmp` and hash them. Returns (files: {name:
    {"bytes", "crc32"}} or None, the exception that stopped the write or None, bytes needed)."""
    shard_file, extra_file = f"shard_rank{rank}.safetensors", f"extra_rank{rank}.pt"
    files, failure, extra_bytes = None, None, pickled(extra)
    try:
        save_file(tensors, str(tmp / shard_file), metadata={"step": str(step), "rank": str(rank)})
        write_bytes(tmp / extra_file, extra_bytes)
        # Each rank hashes what it wrote (read back from the page cache): the cost is split over ranks.
        files = {
            f: {"bytes": (tmp / f).stat().st_size, "crc32": file_crc32(tmp / f)}
            for f in (shard_file, extra_file)
        }
    except Exception as e:  # every rank must learn of it, or the others wait in the gather forever
        failure = e
    need = sum(t.nbytes for t in tensors.values()) + len(extra_bytes)  # this rank's (headers add little)
    return files, failure, need


def _make_room(root: Path, keep_last: int) -> None:
    """Before a save: delete temporary directories of saves that never committed (a crash or a full
    disk; never loaded, they only hold space) and the complete checkpoints beyond the newest
    keep_last - 1, never the newest one, so with keep_last = K a full disk is cured by a smaller K."""
    for p in root.glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)
    _prune(root, max(keep_last - 1, 1))


def _describe(e: Exception | None) -> tuple[bool, str] | None:
    """(disk full?, 'Type: message') of a failed write, picklable for the other ranks; None: no failure."""
    return None if e is None else (is_disk_full(e), f"{type(e).__name__}: {e}")


def _raise_save_failure(root: Path, step: int, need: int, problems: list, failure: Exception | None):
    """Every rank raises: DiskFullError when every failure was a full disk; else this rank's own
    exception (a traceback), or a CheckpointError naming the rank that failed."""
    if all(full for _, (full, _) in problems):
        kept = [p for _, p in complete_steps(root)]
        raise DiskFullError(no_room_message(root, f"checkpoint step_{step}", need, kept)) from failure
    if failure is not None and not is_disk_full(failure):
        raise failure
    r, (_, what) = next((r, p) for r, p in problems if not p[0])
    raise CheckpointError(
        f"checkpoint step_{step} not written: rank {r} failed ({what}); earlier checkpoints kept"
    )


def _prune(root: Path, keep_last: int) -> None:
    for _, p in complete_steps(root)[keep_last:]:
        shutil.rmtree(p, ignore_errors=True)


def _verify_collective(path: Path) -> tuple[dict | None, str | None]:
    """verify_checkpoint split over the ranks: rank 0 reads the manifest, rank r hashes the files
    r, r + W, ... Every rank gets the same (manifest, None) or (None, why)."""
    manifest, why = broadcast_object(read_manifest(path) if is_main() else None)
    if why:
        return None, why
    names = sorted(manifest["files"])[get_rank() :: get_world_size()]
    mine = [p for f in names if (p := file_problem(path, f, manifest["files"][f]))]
    problems = sorted(p for ps in _gather_objects(mine) for p in ps)
    return (None, "; ".join(problems)) if problems else (manifest, None)


def _load_extra(path: Path, manifest: dict) -> tuple[dict | None, str | None]:
    """This rank's `extra` (rank 0's when this rank did not exist in the saving run), or the reason
    some rank's file does not unpickle (collective: every rank gets the same verdict)."""
    src = get_rank() if get_rank() < manifest["world_size"] else 0
    extra, why = None, None
    try:
        extra = torch.load(path / f"extra_rank{src}.pt", weights_only=False)
    except Exception as e:  # any unpickling failure: this checkpoint is unusable, not the run
        why = f"extra_rank{src}.pt does not unpickle ({type(e).__name__}: {e})"
    problems = sorted({w for w in _gather_objects(why) if w})
    return (None, "; ".join(problems)) if problems else (extra, None)


def _select_checkpoint(root: Path) -> tuple[Path, dict, dict] | None:
    """The newest usable checkpoint under `root` as (path, manifest, this rank's extra); None when
    there is none at all; CheckpointError when some exist and none is usable (collective)."""
    steps = None
    if is_main():
        for tmp in sorted(root.glob(".tmp_step_*")):
            log.warning(
                f"skipping partial checkpoint {tmp} (never completed: still under its temporary name)"
            )
        steps = [str(p) for _, p in complete_steps(root)]
    skipped = []
    for path in map(Path, broadcast_object(steps)):
        manifest, why = _verify_collective(path)
        if why is None:
            extra, why = _load_extra(path, manifest)
        if why is None:
            if is_main():
                _quarantine([p for p, _ in skipped])
            barrier()
            return path, manifest, extra
        skipped.append((path, why))
        if is_main():
            log.warning(f"skipping checkpoint {path}: {why}")
    if skipped:
        raise CheckpointError(
            f"{len(skipped)} checkpoint(s) in {root} and none is usable:\n"
            + "".join(f"  {p}: {why}\n" for p, why in skipped)
            + "Restore or move them away, or start a fresh run (a new run.name, or --overwrite)."
        )
    return None


def _quarantine(paths: list[Path]) -> None:
    """Rename unusable checkpoints (all newer than the one loaded) to step_N.corrupt[-k]: kept for
    inspection, and out of the way of pruning, which would keep them over the resumed run's saves."""
    for p in paths:
        dst, k = p.with_name(f"{p.name}.corrupt"), 1
        while dst.exists():
            dst, k = p.with_name(f"{p.name}.corrupt-{k}"), k + 1
        os.rename(p, dst)
        log.warning(f"moved the unusable checkpoint {p} to {dst.name}")


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
    """Load the newest intact checkpoint into `fsdp` (and `optimizer`, if given) on every rank;
    reshards when the world size changed. Returns this rank's `extra` dict with "step" added; None
    when the run directory has no checkpoint at all; raises CheckpointError (naming every
    checkpoint and why it is unusable) when there are checkpoints but none is usable (collective)."""
    root = Path(run_dir) / "checkpoints"
    if not broadcast_object(root.is_dir() if is_main() else None):
        return None
    found = _select_checkpoint(root)
    if found is None:
        return None
    path, manifest, extra = found
    new_layout = fsdp.layout()
    rank = get_rank()
    resharded = manifest["world_size"] != new_layout["world_size"]
    log.info(
        f"loading {path} (saved by {manifest['world_size']} ranks, loading on {new_layout['world_size']})"
    )

    shards, opt_state = _read_units(path, manifest, new_layout, rank)
    fsdp.load_sharded_state_dict({n: t.to(fsdp.device) for n, t in shards.items()})
    if optimizer is not None and manifest["param_groups"]:
        _load_optimizer(optimizer, fsdp, manifest["param_groups"], opt_state)

    if resharded and rank >= manifest["world_size"]:
        log.info(f"rank {rank} did not exist in the saving run: it gets rank 0's extra state")
    return {**extra, "step": manifest["step"]}


def _read_units(path: Path, manifest: dict, new_layout: dict, rank: int) -> tuple[dict, dict]:
    """This rank's range of every unit of `new_layout` from checkpoint `path` (any saving world
    size): ({unit: fp32 params}, {unit: AdamW state, for the units that have one})."""
    old_units = {u["name"]: u | {"world_size": manifest["world_size"]} for u in manifest["layout"]["units"]}
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
                # identical on every rank; a copy: a tensor backed by the file would keep it mapped,
                # so its space would not come back when the checkpoint is pruned (a full disk)
                state["step"] = f0.get_tensor(f"{name}/step").clone()
            if state:
                opt_state[name] = state
    return shards, opt_state


def load_moments(source, *, fsdp, optimizer) -> dict:
    """Seed a fresh `optimizer` with the AdamW state (exp_avg, exp_avg_sq, step count) of another
    run's checkpoint, keeping this optimizer's own hyper-parameters (lr, betas, ...). `source`: a
    `step_N/` directory, or a run directory (its newest complete checkpoint). The checkpoint's weights
    must be the very weights `fsdp` holds (e.g. model.path = that run's final/): moments of other
    weights would steer the first updates, so any difference is a ValueError. Reads `source` only
    (nothing renamed or pruned there); reshards like a resume; collective. Returns {"path", "step"}."""
    path = _moments_checkpoint(Path(source))
    manifest, why = _verify_collective(path)
    if why:
        raise CheckpointError(f"optim.moments_from: the checkpoint {path} is unusable: {why}")
    shards, opt_state = _read_units(path, manifest, fsdp.layout(), get_rank())
    params = dict(fsdp.named_parameters())
    missing = [n for n in params if not {"exp_avg", "exp_avg_sq", "step"} <= set(opt_state.get(n, {}))]
    if missing:
        raise ValueError(
            f"optim.moments_from: {path} holds no AdamW state for {len(missing)} of {len(params)} units "
            f"(first: {missing[0]}): a checkpoint saved before any optimizer step?"
        )
    differ = sum(int((shards[n].to(p.device) != p.detach()).sum()) for n, p in params.items())
    differ = int(all_reduce_sum(float(differ)))
    if differ:
        raise ValueError(
            f"optim.moments_from: {differ} parameter elements of the model differ from {path}'s weights: "
            "its moments belong to other weights (set model.path to the final/ that this checkpoint "
            "exported, or clear optim.moments_from)"
        )
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    sd = optimizer.state_dict()
    sd["state"] = {index[id(params[n])]: opt_state[n] for n in params}
    optimizer.load_state_dict(sd)  # this optimizer's param_groups stay; moments cast to each shard
    return {"path": str(path), "step": manifest["step"]}


def _moments_checkpoint(source: Path) -> Path:
    """`source` itself when it is a checkpoint (has a manifest), else the newest complete step_N of
    `source`/checkpoints; a clear error otherwise."""
    if (source / MANIFEST).is_file():
        return source
    steps = complete_steps(source / "checkpoints") if (source / "checkpoints").is_dir() else []
    if not steps:
        raise CheckpointError(
            f"optim.moments_from={str(source)!r}: neither a checkpoint (no {MANIFEST}) nor a run directory "
            "with a complete checkpoints/step_N"
        )
    return steps[0][1]  # newest first


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
    `transformers.LlamaForCausalLM.from_pretrained`. Raises CheckpointError, before writing, when
    a parameter is non-finite."""
    if why := _nonfinite_parameters(fsdp):
        raise CheckpointError(f"refusing to export {out_dir}: {why}")
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
