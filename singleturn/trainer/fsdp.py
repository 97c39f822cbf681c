"""Hand-written FSDP (ZeRO-3) for `model.Transformer`, applied from outside the model.

Units: one per transformer block (`layers.i`), one for `tok_embeddings`, one for `norm` + `output`
("head"). With tied embeddings (`output.weight is tok_embeddings.weight`) the embedding and the
head share a weight, so they form ONE unit ("embed_head").

Per unit, every rank holds an fp32 *master shard*: the unit's parameters flattened in a fixed
order, zero-padded to a multiple of the world size, rank r owning elements [r*S, (r+1)*S).
The module's own parameters become `nn.Parameter` views of one flat `param_dtype` buffer whose
storage is allocated (resize) and all-gathered before use and resized to 0 bytes when freed.
Autograd saves those parameter views; because freeing/re-gathering only resizes the storage (the
tensors stay the same objects), saved tensors are valid again once the unit is re-gathered.

Schedule (per training micro-step):
- forward pre-hook of a unit: wait for / issue its all-gather, then prefetch the next unit's
  all-gather (async work; on CUDA the cast + collective run on a side stream);
- forward post-hook: register a pre-backward hook on the outputs, free the full parameters
  (blocks and the untied embedding). The head unit is *sticky*: it stays gathered from the norm's
  forward until its gradients are reduced, so the trainer may call `h = model.hidden(tokens)` and
  then `kernels.token_logprobs(h, model.output.weight, targets)` outside any module forward:
  `model.output.weight` is the full weight and its gradient reaches the shard;
- pre-backward (tensor hook on the unit's outputs): re-gather the unit (not the untied embedding,
  whose backward reads no weight values), prefetch the previous one;
- post-backward (AccumulateGrad hooks; a final autograd callback for stragglers): copy the full
  gradients into a flat `reduce_dtype` buffer, reduce-scatter into the master shard's `.grad`
  (accumulating over micro-batches), free the full parameters and gradients.
`grad_reduce="sum"` (default) sums gradients over ranks: the trainer normalizes its loss by the
GLOBAL token count. `"mean"` divides by the world size (DDP convention).

Contract for callers:
- Move the model to its device (and initialize/load weights) BEFORE `apply_fsdp`; the model's
  parameters are replaced by views afterwards, so optimize `fsdp.parameters()`, never
  `model.parameters()`.
- Every rank runs the same forwards/backwards (collectives are issued from hooks, in order).
- Supported patterns: forward -> backward per micro-batch (gradient accumulation adds into the
  shard grads); no-grad forwards at any time (the sticky head is freed at the next forward or by
  `fsdp.reshard()`).

API:
    fsdp = apply_fsdp(model, *, param_dtype=torch.float32, reduce_dtype=torch.float32,
                      activation_checkpointing=False, group=None, grad_reduce="sum") -> HandFSDP
    fsdp.parameters() -> list[nn.Parameter]          # fp32 master shards (for torch.optim.AdamW)
    fsdp.clip_grad_norm_(max_norm) -> Tensor         # global L2 norm over all ranks (pre-clip)
    with fsdp.summon_full_params(dtype=torch.bfloat16, writeback=False): ...  # rollouts / eval
    fsdp.reshard()                                   # free every gathered unit not awaiting backward
    fsdp.full_state_dict(rank0_only=False) -> dict[str, Tensor]  # fp32, CPU, like model.state_dict()
    fsdp.sharded_state_dict() / fsdp.load_sharded_state_dict(sd) # {unit name: fp32 shard}
    fsdp.layout() -> dict                            # flat layout per unit (checkpoint manifest)
    fsdp.memory_report(optimizer=None) -> dict       # per-rank bytes vs unsharded

Layout: fsdp_units.py (the flat unit, collectives), fsdp_state.py (summon, state dicts, layout,
memory report: `FSDPStateMixin`), this file (the schedule: hooks, gather/free, reduce-scatter).

References: PyTorch FSDP2 (`torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py`,
`_fsdp_state.py`: pre-backward hooks on forward outputs, post-backward via AccumulateGrad hooks and a
final callback); FSDP1 `FlatParamHandle` (flat parameters, storage resize); torchtitan
`distributed/parallelize` (per-block units, activation checkpointing per block).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from singleturn.trainer.fsdp_state import FSDPStateMixin
from singleturn.trainer.fsdp_units import FlatUnit, ParamSlot, all_gather, reduce_scatter, resize_storage

__all__ = ["apply_fsdp", "HandFSDP"]


class HandFSDP(FSDPStateMixin):
    """Handle returned by `apply_fsdp`; see the module docstring."""

    def __init__(self, model, *, param_dtype, reduce_dtype, activation_checkpointing, group, grad_reduce):
        if grad_reduce not in ("sum", "mean"):
            raise ValueError(f"grad_reduce must be 'sum' or 'mean', got {grad_reduce!r}")
        self.model = model
        self.param_dtype, self.reduce_dtype, self.grad_reduce = param_dtype, reduce_dtype, grad_reduce
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.device = model.tok_embeddings.weight.device
        self._ag_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._summoned = False
        self._callback_queued = False
        # schedule counters (tests check the gather/free pattern; cheap enough to keep on)
        self.stats = {"all_gather": 0, "reduce_scatter": 0, "max_gathered": 0}

        tied = model.output.weight is model.tok_embeddings.weight
        blocks = [(f"layers.{i}", [blk], False) for i, blk in enumerate(model.layers)]
        if tied:
            specs = [("embed_head", [model.tok_embeddings, model.norm, model.output], True), *blocks]
        else:
            specs = [("tok_embeddings", [model.tok_embeddings], False), *blocks]
            specs.append(("head", [model.norm, model.output], True))
        fqns_of: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            fqns_of.setdefault(id(p), []).append(name)
        self.units = [self._build_unit(i, *spec, fqns_of) for i, spec in enumerate(specs)]
        covered = {f for u in self.units for s in u.slots for f in s.fqns}
        missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in covered]
        if missing:
            raise ValueError(f"apply_fsdp: parameters outside every unit: {missing}")
        if not tied:
            # embedding backward scatters the output grad by token id; the weight's values are never
            # read, so skip its re-gather (for a 128k vocab the largest all-gather of the step)
            self.units[0].gather_in_backward = False
        for u in self.units:
            self._register_hooks(u)
        if activation_checkpointing:
            for blk in model.layers:
                blk.forward = functools.partial(_checkpointed, blk.forward)

    # ---- construction -------------------------------------------------------------------------
    def _build_unit(self, index, name, modules, sticky, fqns_of) -> FlatUnit:
        seen: dict[int, nn.Parameter] = {}
        for m in modules:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        originals = list(seen.values())
        slots, offset = [], 0
        for p in originals:
            slots.append(ParamSlot(fqns_of[id(p)], p.shape, offset, p.numel()))
            offset += p.numel()
        numel = offset
        padded = -(-numel // self.world) * self.world
        shard_numel = padded // self.world
        with torch.no_grad():
            flat = torch.zeros(padded, dtype=torch.float32, device=self.device)
            for s, p in zip(slots, originals):
                flat[s.offset : s.offset + s.numel].copy_(p.detach().reshape(-1))
            lo = self.rank * shard_numel
            requires_grad = any(p.requires_grad for p in originals)
            shard = nn.Parameter(flat[lo : lo + shard_numel].clone(), requires_grad=requires_grad)
        del flat
        full = torch.empty(padded, dtype=self.param_dtype, device=self.device)
        full_io = torch.empty(0, dtype=self.param_dtype, device=self.device)
        full_io.set_(full.untyped_storage(), 0, (padded,))
        params = []
        for s, p in zip(slots, originals):
            view = nn.Parameter(
                full[s.offset : s.offset + s.numel].view(s.shape), requires_grad=p.requires_grad
            )
            params.append(view)
            for fqn in s.fqns:  # re-register under every name (tied weights share one view)
                mod_name, _, attr = fqn.rpartition(".")
                self.model.get_submodule(mod_name)._parameters[attr] = view
        resize_storage(full, 0)
        unit = FlatUnit(name, index, modules, sticky, slots, params, shard, full, full_io, numel, padded)
        unit.n_grad_params = sum(p.requires_grad for p in params)
        return unit

    def _register_hooks(self, u: FlatUnit) -> None:
        for m in u.modules:
            u.hooks.append(m.register_forward_pre_hook(functools.partial(self._pre_forward, u)))
            u.hooks.append(m.register_forward_hook(functools.partial(self._post_forward, u)))
        for p in u.params:
            if p.requires_grad:
                u.hooks.append(p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, u)))

    # ---- gather / free ------------------------------------------------------------------------
    def _gather(self, u: FlatUnit, *, async_op: bool) -> None:
        """All-gather u's master shard (cast to param_dtype) into its full buffer."""
        if u.gathered or u.pending is not None:
            return
        # Collectives write through full_io, a tensor with its own version counter on the same
        # storage: re-gathering must not bump the version of the parameter views autograd saved.
        resize_storage(u.full, u.padded)  # allocated on the current stream (see _wait)
        self.stats["all_gather"] += 1
        live = sum(v.gathered or v.pending is not None for v in self.units) + 1
        self.stats["max_gathered"] = max(self.stats["max_gathered"], live)
        if not self.distributed or self.world == 1:
            with torch.no_grad():
                u.full_io.copy_(u.shard.detach())
            u.gathered = True
            return
        if self._ag_stream is not None:
            self._ag_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._ag_stream):
                inp = u.shard.detach().to(self.param_dtype)
                work = all_gather(u.full_io, inp, group=self.group, async_op=True)
                event = self._ag_stream.record_event()
        else:
            inp = u.shard.detach().to(self.param_dtype)
            work = all_gather(u.full_io, inp, group=self.group, async_op=async_op)
            event = None
        u.pending = (work, inp, event)
        if not async_op:
            self._wait(u)

    def _wait(self, u: FlatUnit) -> None:
        if u.pending is None:
            return
        work, _inp, event = u.pending
        if work is not None:
            work.wait()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)  # compute waits for the side stream
        u.pending = None
        u.gathered = True

    def _ensure_gathered(self, u: FlatUnit) -> None:
        if u.pending is not None:
            self._wait(u)
        elif not u.gathered:
            self._gather(u, async_op=False)

    def _free(self, u: FlatUnit) -> None:
        self._wait(u)
        if u.gathered:
            resize_storage(u.full, 0)
            u.gathered = False

    def gathered_units(self) -> list[str]:
        """Names of the units whose full parameters are currently allocated."""
        return [u.name for u in self.units if u.gathered or u.pending is not None]

    def reshard(self) -> None:
        """Free every gathered unit that is not waiting for its backward (e.g. after no-grad forwards)."""
        for u in self.units:
            if not u.awaiting_backward:
                self._free(u)

    # ---- hooks --------------------------------------------------------------------------------
    def _pre_forward(self, u: FlatUnit, module, args):
        if self._summoned:
            return
        i = u.index
        if i == 0:  # a new forward starts (AC recomputation never runs these hooks)
            self._callback_queued = False  # in case a failed backward never ran its final callback
            if not u.gathered:
                self.reshard()  # drop leftovers of no-grad forwards
        self._ensure_gathered(u)
        if module is u.modules[0] and i + 1 < len(self.units):
            self._gather(self.units[i + 1], async_op=True)  # prefetch the next unit

    def _post_forward(self, u: FlatUnit, module, args, output):
        if self._summoned:
            return output
        outs = [t for t in _tensors(output) if t.requires_grad]
        if torch.is_grad_enabled() and outs and u.n_grad_params:
            u.awaiting_backward = True
            for t in outs:
                t.register_hook(functools.partial(self._pre_backward, u))
        if not u.sticky:
            self._free(u)
        return output

    def _pre_backward(self, u: FlatUnit, grad):
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._final_callback)
        if u.gather_in_backward:
            self._ensure_gathered(u)
        prev = self.units[u.index - 1] if u.index > 0 else None
        if prev is not None and prev.awaiting_backward and prev.gather_in_backward:
            self._gather(prev, async_op=True)  # prefetch the previous unit
        return grad

    def _on_grad(self, u: FlatUnit, param):
        u.grads_ready += 1
        if u.grads_ready == u.n_grad_params:
            self._reduce_grads(u)

    def _final_callback(self):
        # Units whose parameters did not all receive a gradient (e.g. only the norm weight of the
        # head was used) are reduced here, with zeros for the missing parts.
        for u in reversed(self.units):
            if u.grads_ready:
                self._reduce_grads(u)
        self._callback_queued = False
        self.reshard()

    def _reduce_grads(self, u: FlatUnit) -> None:
        """Reduce-scatter u's full gradients (in reduce_dtype) into its master shard's .grad."""
        flat = torch.zeros(u.padded, dtype=self.reduce_dtype, device=self.device)  # padding stays 0
        for s, p in zip(u.slots, u.params):
            if p.grad is not None:
                flat[s.offset : s.offset + s.numel].copy_(p.grad.reshape(-1))  # upcast if bf16
                p.grad = None
        shard_numel = u.padded // self.world
        self.stats["reduce_scatter"] += 1
        if self.distributed and self.world > 1:
            out = torch.empty(shard_numel, dtype=self.reduce_dtype, device=self.device)
            reduce_scatter(out, flat, op=dist.ReduceOp.SUM, group=self.group)
        else:
            out = flat
        if self.grad_reduce == "mean" and self.world > 1:
            out.div_(self.world)
        out = out.to(torch.float32)
        if u.shard.grad is None:
            u.shard.grad = out
        else:
            u.shard.grad.add_(out)
        u.grads_ready = 0
        u.awaiting_backward = False
        self._free(u)

    # ---- public API ---------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The fp32 master shards, one per unit: what the optimizer updates."""
        return [u.shard for u in self.units]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(u.name, u.shard) for u in self.units]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale shard grads so the GLOBAL L2 norm is <= max_norm (torch.nn.utils.clip_grad_norm_
        semantics: coef = max_norm / (norm + 1e-6), clamped to 1). Returns the pre-clip norm (fp32)."""
        grads = [u.shard.grad for u in self.units if u.shard.grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            sq += g.float().pow(2).sum()
        if self.distributed and self.world > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.group)
        total = sq.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef)
        return total


def _tensors(x) -> list[torch.Tensor]:
    # the units' modules return a tensor; tolerate a flat tuple/list (e.g. a block returning extras)
    return [x] if isinstance(x, torch.Tensor) else [t for t in x if isinstance(t, torch.Tensor)]


def _checkpointed(forward, *args, **kwargs):
    # Non-reentrant: the recomputation in backward calls the block's forward directly (no module
    # hooks fire); the block's parameters are already re-gathered by its pre-backward hook.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_fsdp(
    model: nn.Module,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    group: dist.ProcessGroup | None = None,
    grad_reduce: str = "sum",
) -> HandFSDP:
    """Shard `model` (a `model.Transformer`, already on its device) over `group` (default: world).

    Returns the `HandFSDP` handle; the model keeps its interface (`model(tokens)`, `model.hidden`,
    `model.output.weight`). Works without a process group (world size 1).
    """
    return HandFSDP(
        model,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        activation_checkpointing=activation_checkpointing,
        group=group,
        grad_reduce=grad_reduce,
    )
