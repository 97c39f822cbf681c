"""The flat-parameter unit of hand FSDP (trainer/fsdp.py): where each parameter lives in its unit's
flat buffer, the unit's shard / full buffers and schedule state, and the flat-tensor collectives."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

# torch 2.13 renamed the flat-tensor collectives; older torch (GPU installs keep theirs) has the old names.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class ParamSlot:
    """One parameter's place in its unit's flat buffer; `fqns` lists every name it has (tied)."""

    fqns: list[str]
    shape: torch.Size
    offset: int
    numel: int


@dataclass(eq=False)
class FlatUnit:
    """One FSDP unit: its modules, flat fp32 master shard, full param_dtype buffer, schedule state."""

    name: str
    index: int  # position in forward order
    modules: list[nn.Module]
    sticky: bool
    slots: list[ParamSlot]
    params: list[nn.Parameter]  # the views registered in the modules (full, param_dtype)
    shard: nn.Parameter  # fp32 master shard [shard_numel]
    full: torch.Tensor  # [padded] param_dtype; params are views of it (storage freed when resharded)
    full_io: torch.Tensor  # same storage, own version counter: collectives write here (see HandFSDP._gather)
    numel: int
    padded: int
    gathered: bool = False
    pending: tuple | None = None  # (work, input, cuda event) of an async all-gather
    awaiting_backward: bool = False
    grads_ready: int = 0
    n_grad_params: int = 0
    gather_in_backward: bool = True  # False for an untied embedding: its backward needs no weight
    hooks: list = field(default_factory=list)


def resize_storage(t: torch.Tensor, numel: int) -> None:
    t.untyped_storage().resize_(numel * t.element_size())
