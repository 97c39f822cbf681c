"""Whole-model views of hand FSDP's shards (trainer/fsdp.py): summoning the full weights for rollouts
and evaluation, full and sharded state dicts, the flat layout for checkpoints, the memory report.

`FSDPStateMixin` is a base of `HandFSDP`; it reads the handle's `model`, `units`, `world`, `rank`,
`device`, `group`, `distributed`, `param_dtype` and calls its `reshard()`.
"""

from __future__ import annotations

import contextlib

import torch

from singleturn.trainer.fsdp_units import FlatUnit, all_gather


class FSDPStateMixin:
    """Full-weight and state-dict methods of `HandFSDP` (collective where they gather)."""

    @contextlib.contextmanager
    def summon_full_params(self, dtype: torch.dtype | None = torch.bfloat16, writeback: bool = False):
        """Gather every unit once (in `dtype`, default bf16) and leave full weights in the model.

        Meant for rollouts / evaluation: inside, the model runs as a plain module (no hooks, no
        collectives), e.g. `generate(model, ...)`. On exit the full weights are freed; with
        `writeback=True` this rank's slice of the (possibly modified) full weights is copied back
        into the master shard. Cannot be entered while a backward is pending.
        """
        if any(u.awaiting_backward for u in self.units):
            raise RuntimeError(
                "summon_full_params: a forward ran with grad enabled and its backward has not run yet; "
                "call it after backward(), and wrap forwards that need no gradient in torch.no_grad()"
            )
        self.reshard()
        dtype = dtype or self.param_dtype
        saved = []
        try:
            self._summoned = True
            for u in self.units:
                flat = self._gather_flat(u, dtype)
                datas = [p.data for p in u.params]
                saved.append((u, flat, datas))
                for s, p in zip(u.slots, u.params):
                    p.data = flat[s.offset : s.offset + s.numel].view(s.shape)
            yield self.model
        finally:
            self._summoned = False
            for u, flat, datas in saved:
                if writeback:
                    n = u.padded // self.world
                    with torch.no_grad():
                        u.shard.copy_(flat[self.rank * n : (self.rank + 1) * n])
                for p, d in zip(u.params, datas):
                    p.data = d
            saved.clear()

    def _gather_flat(self, u: FlatUnit, dtype: torch.dtype) -> torch.Tensor:
        """A new [padded] tensor of `dtype` holding u's full flat parameters (collective)."""
        inp = u.shard.detach().to(dtype)
        if not self.distributed or self.world == 1:
            return inp.clone() if inp.data_ptr() == u.shard.data_ptr() else inp  # never alias the master
        out = torch.empty(u.padded, dtype=dtype, device=self.device)
        all_gather(out, inp, group=self.group)
        return out

    @torch.no_grad()
    def full_state_dict(self, rank0_only: bool = False) -> dict[str, torch.Tensor] | None:
        """fp32 CPU tensors keyed like `model.state_dict()` (tied names share one tensor). Collective;
        with rank0_only, other ranks get None."""
        managed = {f for u in self.units for s in u.slots for f in s.fqns}
        out = {}
        for u in self.units:
            flat = self._gather_flat(u, torch.float32).cpu()
            for s in u.slots:
                t = flat[s.offset : s.offset + s.numel].view(s.shape).clone()
                for f in s.fqns:
                    out[f] = t
        for name, t in self.model.state_dict().items():  # persistent buffers, if any
            if name not in managed:
                out[name] = t.detach().cpu().clone()
        return None if rank0_only and self.rank != 0 else out

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """{unit name: this rank's fp32 master shard} (detached, shares memory)."""
        return {u.name: u.shard.detach() for u in self.units}

    @torch.no_grad()
    def load_sharded_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy shards (same world size / layout as `sharded_state_dict`) into the master shards."""
        for u in self.units:
            src = sd[u.name]
            if src.shape != u.shard.shape:
                raise ValueError(
                    f"shard of {u.name}: expected {tuple(u.shard.shape)}, got {tuple(src.shape)}"
                )
            u.shard.copy_(src)
        self.reshard()

    def layout(self) -> dict:
        """The flat layout (for checkpoint manifests and resharding to another world size)."""
        units = []
        for u in self.units:
            params = [
                {"fqns": s.fqns, "shape": list(s.shape), "offset": s.offset, "numel": s.numel}
                for s in u.slots
            ]
            units.append({"name": u.name, "numel": u.numel, "padded": u.padded, "params": params})
            units[-1]["shard_numel"] = u.padded // self.world
        return {"world_size": self.world, "units": units}

    def memory_report(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Per-rank bytes of master params + grads + optimizer state, vs the unsharded fp32 total."""
        shards = self.parameters()
        param_b = sum(p.numel() * p.element_size() for p in shards)
        grad_b = sum(p.grad.numel() * p.grad.element_size() for p in shards if p.grad is not None)
        optim_b = 0
        if optimizer is not None:
            for p in shards:
                for v in optimizer.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.numel() > 1:  # skip scalar `step`
                        optim_b += v.numel() * v.element_size()
        local_numel = sum(p.numel() for p in shards)
        full_numel = sum(u.numel for u in self.units)
        total = param_b + grad_b + optim_b
        unsharded = total * full_numel / max(local_numel, 1)
        return {
            "world_size": self.world,
            "param_bytes": param_b,
            "grad_bytes": grad_b,
            "optim_bytes": optim_b,
            "total_bytes": total,
            "unsharded_bytes": int(unsharded),
            "fraction": total / unsharded if unsharded else 0.0,
        }
