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


def prefix_hosts(prompts: list[list[int]]) -> list[int]:
    """For each prompt, the index of the longest prompt it is a prefix of (itself if none is longer).

    The turns of one episode-format episode extend one another, so their features are all read off
    one forward of the episode's last prompt; window-format prompts host themselves."""
    hosts: list[int] = []  # longest first
    host_of = [0] * len(prompts)
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        p, n = prompts[i], len(prompts[i])
        host_of[i] = next((h for h in hosts if prompts[h][:n] == p), i)
        if host_of[i] == i:
            hosts.append(i)
    return host_of


@torch.no_grad()
def state_features(
    model, prompts: list[list[int]], *, device, micro_batch_size: int = 32, pad_id: int = PACK_PAD
) -> torch.Tensor:
    """Final hidden state at the last token of each prompt: [n, D] fp32 on cpu (no grad).

    Run with full weights present (inside `fsdp.summon_full_params`, or an unsharded model). Only
    the prompts that extend no other are computed (`prefix_hosts`; causal attention: a prefix's
    hidden states are its host's first positions), right-padded per micro-batch, longest first.
    """
    host_of = prefix_hosts(prompts)
    hosts = sorted(set(host_of), key=lambda h: -len(prompts[h]))
    members: dict[int, list[int]] = {h: [] for h in hosts}
    for i, h in enumerate(host_of):
        members[h].append(i)
    out = torch.zeros(len(prompts), model.output.weight.shape[1])
    for k in range(0, len(hosts), micro_batch_size):
        mb = hosts[k : k + micro_batch_size]
        tokens = torch.full((len(mb), len(prompts[mb[0]])), pad_id, dtype=torch.int64)
        for b, h in enumerate(mb):
            tokens[b, : len(prompts[h])] = torch.tensor(prompts[h], dtype=torch.int64)
        hid = model.hidden(tokens.to(device))  # (B, T, D)
        for b, h in enumerate(mb):
            idx = members[h]
            last = torch.tensor([len(prompts[i]) - 1 for i in idx], device=device)  # (m,)
            out[idx] = hid[b, last].float().cpu()  # (m, D)
    return out


def sync_grads(head: nn.Module) -> None:
    """Sum the replicated head's gradients over ranks (no-op on one process)."""
    for p in head.parameters():
        if p.grad is not None:
            p.grad.copy_(all_reduce_sum(p.grad))
