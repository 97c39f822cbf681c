"""The PPO critic: a value head on the policy's final hidden state at each turn's state position.

The state of turn t is its rendered prompt; its feature is the policy's final-norm hidden state at
the LAST prompt token (the position that predicts the first action token), `model.hidden(...)`
[D]. The critic reads that feature through a stop-gradient: `ValueHead` is a linear head (or, with
`hidden_dim > 0`, a small MLP) trained by regression on the GAE returns with its own optimizer, so
the value loss never perturbs the policy's weights (no policy/value interference and no second
model: verl uses a separate critic model; a shared-trunk head is the other common choice).

Because features are taken with the rollout's full weights (inside `fsdp.summon_full_params`, no
collectives), ranks may hold different numbers of turns; the head is replicated, its gradients are
summed over ranks (`sync_grads`) and normalized by the global turn count, like the policy's.
"""

from __future__ import annotations

import torch
from torch import nn

from singleturn.trainer.data import PACK_PAD
from singleturn.trainer.dist import all_reduce_sum


class ValueHead(nn.Module):
    """V(s) from a feature [.., D] -> [..] fp32. Zero-initialized output layer: V = 0 at the start."""

    def __init__(self, dim: int, *, hidden_dim: int = 0):
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        if hidden_dim > 0:
            self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))
            nn.init.normal_(self.net[0].weight, std=dim**-0.5)
            nn.init.zeros_(self.net[0].bias)
        else:
            self.net = nn.Sequential(nn.Linear(dim, 1))
        nn.init.zeros_(self.net[-1].weight)  # V = 0 before any training: GAE starts from Monte Carlo
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).squeeze(-1)  # (...,) fp32


@torch.no_grad()
def state_features(
    model, prompts: list[list[int]], *, device, micro_batch_size: int = 32, pad_id: int = PACK_PAD
) -> torch.Tensor:
    """Final hidden state at the last token of each prompt: [n, D] fp32 on cpu (no grad).

    Run with full weights present (inside `fsdp.summon_full_params`, or an unsharded model).
    Prompts are right-padded per micro-batch (causal attention: the pads never reach real tokens).
    """
    out = []
    for i in range(0, len(prompts), micro_batch_size):
        mb = prompts[i : i + micro_batch_size]
        T = max(len(p) for p in mb)
        tokens = torch.full((len(mb), T), pad_id, dtype=torch.int64)
        for b, p in enumerate(mb):
            tokens[b, : len(p)] = torch.tensor(p, dtype=torch.int64)
        h = model.hidden(tokens.to(device))  # (B, T, D)
        last = torch.tensor([len(p) - 1 for p in mb], device=device)  # (B,)
        out.append(h[torch.arange(len(mb), device=device), last].float().cpu())  # (B, D)
    if not out:
        return torch.zeros(0, model.output.weight.shape[1])
    return torch.cat(out)


def sync_grads(head: nn.Module) -> None:
    """Sum the replicated head's gradients over ranks (no-op on one process)."""
    for p in head.parameters():
        if p.grad is not None:
            p.grad.copy_(all_reduce_sum(p.grad))
