"""`rollout.dtype = "auto"` and `fsdp.autocast = "auto"`: resolved once, at parse time, to what this
machine runs fastest (singleturn.model.precision), with one printed line saying what and why.

The resolved value is what the run uses, saves in config.json and compares on --resume (a run resumed
on a machine that resolves differently is refused with the differing key: set the dtype explicitly to
move it). Explicit values are never changed. Several ranks decide by the CPU flags (all agree); the
timing probe, used only when the flags cannot be read, runs only for a single process.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from singleturn.model.precision import fastest_dtype

AUTO = "auto"


def resolve_auto_dtypes(cfg, *, device_type: str | None = None, world_size: int | None = None, log=print):
    """cfg with every "auto" dtype setting replaced by this machine's fastest; returns the new cfg."""
    if cfg.rollout.dtype != AUTO and cfg.fsdp.autocast != AUTO:
        return cfg
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"  # as trainer.dist picks the device
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dtype, why = fastest_dtype(device_type, probe=world_size == 1)
    rollout, fsdp = cfg.rollout, cfg.fsdp
    chosen = []
    if rollout.dtype == AUTO:
        rollout = dataclasses.replace(rollout, dtype=dtype)
        chosen.append(f"rollout.dtype = {dtype}")
    if fsdp.autocast == AUTO:
        fsdp = dataclasses.replace(fsdp, autocast="bfloat16" if dtype == "bfloat16" else "none")
        chosen.append(f"fsdp.autocast = {fsdp.autocast}")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        log(f"[dtype] auto: {', '.join(chosen)} ({device_type}: {why})", flush=True)
    return dataclasses.replace(cfg, rollout=rollout, fsdp=fsdp)
