"""The policy loss every RL stage shares: sequences with advantages -> clipped loss over action tokens.

A `Sequence` is one sampled response (prompt ids, response ids, behaviour log-probs, one advantage
broadcast to its tokens). Single-turn GRPO builds them from groups of G responses per state
(`select_sequences`); the multi-turn baselines from the turns of played episodes (trainer/stages/).

Single-turn GRPO, per rollout batch (B states x G responses on each rank, prompt-major):
1. r = 1{parse_action(response) == expert_action} (trainer/reward.py);
2. A = kernels.group_advantages(r, G) (zero-variance groups get exactly 0);
3. zero-variance groups are DROPPED (counted): they carry no gradient but would cost compute.
   With grpo.oversample = k > 1 (dynamic sampling, as in DAPO) the rollout covers k x batch_size
   states and the first batch_size groups WITH reward variance are kept (in batch order), so a
   policy that already solves most training states still gets full batches of informative groups;
4. for ppo_epochs epochs: kernels.grpo_loss over the response tokens of the kept sequences, with the
   sampled log-probs as the behaviour policy (old_logp) and, when kl_coef > 0, the k3 KL to a frozen
   reference; the summed loss is divided by the GLOBAL response-token count (all ranks, all
   micro-batches), gradients are summed over ranks, so the update equals one big batch on one device.

FSDP needs every rank to run the same number of forward/backward passes. After dropping, ranks may
hold different numbers of sequences: each rank runs max-over-ranks micro-batches, padding with a
dummy micro-batch whose loss is multiplied by 0 (exactly zero gradient, the collectives still run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from singleturn.kernels.group_advantages import group_advantages
from singleturn.kernels.grpo_loss import grpo_loss
from singleturn.kernels.token_logprobs import token_logprobs
from singleturn.model.masks import build_prefix_chain_batch, build_shared_prefix_batch
from singleturn.trainer.data import PACK_PAD, chunks, pack_completions
from singleturn.trainer.dist import all_reduce_sum
from singleturn.trainer.forward_backward import forward_backward, pad_for_ranks, target_hidden
from singleturn.trainer.reward import zero_variance_groups


@dataclass
class Sequence:
    """One sampled response with what its loss needs."""

    prompt: list[int]
    response: list[int]
    old_logp: torch.Tensor  # (L,) fp32: the behaviour (sampling) log-probs
    advantage: float
    ref_logp: torch.Tensor | None = None  # (L,) fp32 under the frozen reference


@dataclass
class PolicyBatch:
    """One rank's sequences for `policy_update` (every RL stage: grpo, ppo, grpo-multiturn, grpo-dagger)."""

    sequences: list[Sequence]
    """This rank's kept sequences (non-zero-variance groups only)."""
    dummy: Sequence
    """A sequence to run (with zero weight) when this rank has fewer micro-batches than others."""
    zero_var_groups: int
    """Groups dropped on this rank."""


def select_sequences(
    prompts: list[list[int]],
    responses: list[list[int]],
    logprobs: list[torch.Tensor],
    rewards: torch.Tensor,
    group_size: int,
    *,
    adv_scale: str = "std",
    max_groups: int | None = None,
    keep_zero_variance: bool = False,
) -> PolicyBatch:
    """Advantages per group, then keep the sequences of groups with reward variance.

    max_groups: keep at most this many (the first ones in order); later groups with variance are
    dropped too (not counted as zero-variance). None: keep all.
    keep_zero_variance: train the zero-variance groups too (advantage 0: no policy gradient, but
    their tokens count in the loss normalization and cost a forward/backward, as in TRL's
    GRPOTrainer). Off in training; bench/bench_vs_trl.py uses it to measure equal work.
    """
    adv = group_advantages(rewards, group_size, scale=adv_scale)  # (B*G,) fp32
    zero_var = zero_variance_groups(rewards, group_size)  # (B,)
    keep = [True] * len(zero_var) if keep_zero_variance else (~zero_var).tolist()
    if max_groups is not None:
        rank = (~zero_var).cumsum(0).tolist()  # 1-based position among the groups with variance
        keep = [k and n <= max_groups for k, n in zip(keep, rank)]
    kept = []
    for i, (resp, lp) in enumerate(zip(responses, logprobs)):
        g = i // group_size
        if not keep[g] or not resp:
            continue
        kept.append(Sequence(prompts[g], resp, lp, float(adv[i])))
    j = next(i for i, r in enumerate(responses) if r)  # generate emits >= 1 token per row
    dummy = Sequence(prompts[j // group_size], responses[j], logprobs[j], 0.0)
    return PolicyBatch(kept, dummy, int(zero_var.sum()))


@dataclass
class MicroBatch:
    """One forward/backward's worth of sequences and their packed inputs."""

    sequences: list[Sequence]
    """In token order: packed.seq[n] indexes this list."""
    weight: float
    """1, or 0 for a padding dummy (exactly zero gradient; the FSDP collectives still run)."""
    packed: object
    """trainer.data.PackedBatch (padded rows) or model.masks.PackedRows (shared-prefix rows)."""


@dataclass(frozen=True)
class Layout:
    """How sequences become rows: `shared_prefix` puts each group's prompt once per row, followed
    by its responses (tree mask, positions restart after the prompt); micro-batches then hold at most
    `max_tokens` computed tokens (B x T). Otherwise each sequence is its own right-padded row and a
    micro-batch holds `micro_batch_size` sequences (the reference path)."""

    shared_prefix: bool = False
    micro_batch_size: int = 32
    max_tokens: int = 8192
    row_len: int | None = None
    """Longest row (default max_tokens): attention over a row costs its length squared."""
    prefix_chains: bool = False
    """With shared_prefix: groups whose prompts extend one another (the episode format's states of one
    episode, a multi-turn rollout's turns) share one trunk (`model.masks.build_prefix_chain_batch`)."""


def _groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Consecutive sequences with the same prompt (a GRPO group; a multi-turn turn is its own)."""
    out: list[list[Sequence]] = []
    for s in seqs:
        if out and (s.prompt is out[-1][0].prompt or s.prompt == out[-1][0].prompt):
            out[-1].append(s)
        else:
            out.append([s])
    return out


def _pack(seqs: list[Sequence], layout: Layout, device) -> list[MicroBatch]:
    if not layout.shared_prefix:
        return [
            MicroBatch(
                mb, 1.0, pack_completions([s.prompt for s in mb], [s.response for s in mb], device=device)
            )
            for mb in chunks(seqs, layout.micro_batch_size)
        ]

    groups = _groups(seqs)
    build = build_prefix_chain_batch if layout.prefix_chains else build_shared_prefix_batch
    packed = build(
        [(g[0].prompt, [s.response for s in g]) for g in groups],
        max_tokens=layout.max_tokens,
        row_len=layout.row_len,
        pad_id=PACK_PAD,
        device=device,
    )
    if layout.prefix_chains:  # a micro-batch holds whole chains, not a consecutive range: renumber
        out = []
        for p in packed:
            ids = torch.unique(p.seq)  # sorted
            out.append(
                MicroBatch(
                    [seqs[i] for i in ids.tolist()], 1.0, replace(p, seq=torch.searchsorted(ids, p.seq))
                )
            )
        assert sum(len(m.sequences) for m in out) == len(seqs), "every sequence is in exactly one micro-batch"
        return out
    out, lo = [], 0
    for p in packed:  # micro-batches hold consecutive sequences (the packer keeps input order)
        hi = int(p.seq.max()) + 1
        out.append(MicroBatch(seqs[lo:hi], 1.0, _shift_seq(p, lo)))
        lo = hi
    assert lo == len(seqs), "every sequence is in exactly one micro-batch"
    return out


def _shift_seq(p, lo: int):
    return replace(p, seq=p.seq - lo)


def micro_batches(batch: PolicyBatch, layout: Layout, *, device="cpu") -> list[MicroBatch]:
    """This rank's micro-batches, padded with zero-weight dummies to the max count over ranks."""
    dummy: list[MicroBatch] = []  # packed once, only when this rank pads

    def pad() -> MicroBatch:
        if not dummy:
            d = _pack([batch.dummy], layout, device)[0]
            dummy.append(MicroBatch(d.sequences, 0.0, d.packed))
        return dummy[0]

    return pad_for_ranks(_pack(batch.sequences, layout, device), pad)


@torch.no_grad()
def fill_reference_logprobs(ref_model, ref_head, mbs: list[MicroBatch], *, temperature: float, autocast=None):
    """ref_logp of every sequence of `mbs` (the dummies' too) under the frozen reference model."""
    for mb in mbs:
        packed = mb.packed
        h_N = target_hidden(ref_model, packed, autocast)  # (N, D)
        logp_N = token_logprobs(h_N, ref_head(), packed.targets, temperature=temperature)
        for b, s in enumerate(mb.sequences):
            s.ref_logp = logp_N[packed.seq == b].float().cpu()


def global_response_tokens(batch: PolicyBatch) -> float:
    """All-reduced count of the kept response tokens: the loss normalizer (host sync)."""
    return all_reduce_sum(float(sum(len(s.response) for s in batch.sequences)))


def grpo_forward_backward(
    model,
    head,
    mbs: list[MicroBatch],
    *,
    global_tokens: float,
    clip_eps_low: float,
    clip_eps_high: float,
    kl_coef: float,
    temperature: float,
    device,
    autocast=None,
) -> dict[str, float]:
    """One epoch's gradients over this rank's micro-batches (trainer.forward_backward, the loss
    `kernels.grpo_loss`); returns globally normalized statistics: loss = sum_tokens grpo_loss /
    global_tokens; clip_frac, ratio, kl are token means. autocast: a context-manager factory around the
    model forward (bf16 autocast), or None.
    """

    def clipped_loss(h_N: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
        packed, seqs = mb.packed, mb.sequences
        adv_N = torch.tensor([s.advantage for s in seqs], dtype=torch.float32, device=device)[packed.seq]
        old_N = torch.cat([s.old_logp for s in seqs]).to(device=device, dtype=torch.float32)  # (N,)
        ref_N = None
        if kl_coef > 0:
            ref_N = torch.cat([s.ref_logp for s in seqs]).to(device=device, dtype=torch.float32)
        out = grpo_loss(
            h_N,
            head(),
            packed.targets,
            adv_N,
            old_N,
            ref_logp=ref_N,
            kl_coef=kl_coef,
            clip_eps_low=clip_eps_low,
            clip_eps_high=clip_eps_high,
            temperature=temperature,
        )
        return out.loss, {"clipped": out.clip_count, "ratio": out.ratio, "kl": out.kl}

    sums = forward_backward(model, mbs, clipped_loss, global_tokens=global_tokens, autocast=autocast)
    n = max(global_tokens, 1.0)
    return {
        "loss": sums["loss"],
        "clip_frac": sums["clipped"] / n,
        "ratio": sums["ratio"] / n,
        "kl": sums["kl"] / n,
        "nonfinite": int(sums["nonfinite"]),
    }
