"""The paper's lower-bound check, per evaluated checkpoint (used by the comparison driver).

Along the expert trajectory of every eval game, record p_t = pi(a*_t | s_t) (the probability of
sampling exactly the expert's action, T = 1) and g_t = 1{the evaluation's deterministic action ==
a*_t} (its `eval.decoding`, greedy or ranked, under the same constraints). If the policy takes the
expert's action at every step it replays the expert's winning episode, so
    P(success) >= prod_t p_t   (sampling policy)      success_greedy >= prod_t g_t   (greedy)
averaged over games. The greedy check is exact against the evaluation's success; the sampling
check plays `sampled_episodes` sampled episodes per game (a binomial 2-sigma margin).
"""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path

import torch

from singleturn.harness import collect_states, read_states, render_prompt
from singleturn.model import Tokenizer, load_hf_checkpoint
from singleturn.model.policy import (
    DTYPES,
    POLICY_FILE,
    PolicySpec,
    encode_prompt,
    prompt_budget,
    response_room,
)
from singleturn.trainer.config import RolloutConfig
from singleturn.trainer.config.auto_dtype import resolve_auto_dtypes
from singleturn.trainer.data import pack_completions, prompt_format
from singleturn.trainer.episode_data import build_episode_examples, episode_micro_batches
from singleturn.trainer.episodes import collect_episodes
from singleturn.trainer.evaluation import policy_spec
from singleturn.trainer.forward_backward import action_logprobs
from singleturn.trainer.fsdp import apply_fsdp
from singleturn.trainer.holdout import agreement_matches


def expert_trajectories(games: list[str], cache: Path, *, max_steps: int) -> dict[str, list[dict]]:
    """game -> the expert's states in step order (games the expert cannot win in max_steps: [])."""
    if not cache.exists():
        tmp = cache.with_suffix(".tmp")
        collect_states(games, tmp, max_steps=max_steps, num_workers=2)
        tmp.rename(cache)
    out: dict[str, list[dict]] = {g: [] for g in games}
    for row in read_states(cache):
        out.setdefault(row["game"], []).append(row)
    return out


@torch.no_grad()
def lower_bound(
    final_dir: Path, trajectories: dict[str, list[dict]], train_cfg, *, sampled_episodes: int, seed: int
) -> dict:
    """Per-step expert agreement along the expert trajectories and the product bounds (module doc)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, mcfg = load_hf_checkpoint(final_dir, device=device, dtype=torch.float32)
    tok = Tokenizer.from_file(str(final_dir / "tokenizer.json"))
    hw, ev = train_cfg.data.history_window, train_cfg.eval
    states = [s for g in trajectories for s in trajectories[g]]
    if train_cfg.data.prompt == "episode":  # one token tree per expert episode, as SFT trains them
        logp = _episode_logprobs(model, _expert_episodes(states, tok, train_cfg, mcfg.max_seq_len), device)
    else:  # the same prompt encoding and length rule as the evaluation policy (its decoding's response room)
        room = dict(decoding=ev.decoding, constrained=ev.constrained, max_new_tokens=ev.max_new_tokens)
        prompts = [
            encode_prompt(
                tok,
                render_prompt(s, hw, train_cfg.data.system_prompt),
                prompt_budget(mcfg.max_seq_len, response_room(tok, s["admissible"], **room)),
            )[0]
            for s in states
        ]
        targets = [tok.encode(s["expert_action"]) + [tok.eot_id] for s in states]
        logp = _sequence_logprobs(model, prompts, targets, device)
    greedy = _greedy_matches(model, tok, eval_spec(final_dir, train_cfg), trajectories)
    out = summarize_bound(trajectories, logp, greedy)
    if sampled_episodes > 0:
        out.update(
            _sampled_success(model, tok, list(trajectories), train_cfg, sampled_episodes, seed, device)
        )
    return out


def summarize_bound(trajectories: dict[str, list[dict]], logp: list[float], greedy: list[bool]) -> dict:
    """The check's numbers from per-state log p_t and g_t (in trajectory order, games apart):
    teacher-forced step accuracy = mean g_t over STATES; each game's bounds prod_t p_t and prod_t g_t
    (0 for a game the expert cannot win: no trajectory), averaged over GAMES."""
    if len(logp) != len(greedy) or len(logp) != sum(map(len, trajectories.values())):
        raise ValueError(f"{len(logp)} log-probs, {len(greedy)} matches for the trajectories' states")
    per_game, k = {}, 0
    for g, traj in trajectories.items():
        lp = logp[k : k + len(traj)]
        gt = greedy[k : k + len(traj)]
        k += len(traj)
        per_game[g] = {
            "steps": len(traj),
            "logp": [round(x, 4) for x in lp],  # log p_t (p_t itself underflows for weak policies)
            "greedy": gt,
            "bound_sampled": math.exp(sum(lp)) if traj else 0.0,
            "bound_greedy": float(all(gt)) if traj else 0.0,
        }
    n = max(len(per_game), 1)
    out = {
        "mean_step_prob": statistics.fmean([x for v in per_game.values() for x in map(math.exp, v["logp"])])
        if logp
        else None,
        "greedy_step_accuracy": statistics.fmean(greedy) if greedy else None,
        "bound_sampled": sum(v["bound_sampled"] for v in per_game.values()) / n,
        "bound_greedy": sum(v["bound_greedy"] for v in per_game.values()) / n,
        "per_game": per_game,
    }
    return out


def _sequence_logprobs(model, prompts: list[list[int]], targets: list[list[int]], device) -> list[float]:
    """log pi(target | prompt) of each pair (the sum over the target's tokens), 16 pairs a forward."""
    logp = []
    for i in range(0, len(prompts), 16):
        packed = pack_completions(prompts[i : i + 16], targets[i : i + 16], device=device)
        lp = action_logprobs(model, lambda: model.output.weight, packed)  # (N,)
        logp.extend(
            torch.zeros(len(packed.tokens), dtype=torch.float64)
            .index_add_(0, packed.seq.cpu(), lp.double().cpu())
            .tolist()
        )
    return logp


def _episode_logprobs(model, episodes: list, device, max_tokens: int = 8192) -> list[float]:
    """log pi(expert action | state) of every state of `episodes` (token trees, the states numbered
    in order): each episode's shared history computed once, not once per state."""
    n = sum(len(ep.states) for ep in episodes)
    logp = torch.zeros(n, dtype=torch.float64)
    row_len = max(ep.num_tokens for ep in episodes) if episodes else 1
    for packed in episode_micro_batches(episodes, max_tokens=max_tokens, row_len=row_len, device=device):
        lp = action_logprobs(model, lambda: model.output.weight, packed)
        logp.index_add_(0, packed.seq.cpu(), lp.double().cpu())
    return logp.tolist()


def eval_spec(final_dir: Path, train_cfg) -> PolicySpec:
    """How the run evaluated: its final/policy.json (dtype as resolved on the machine that ran it),
    else the config's spec with "auto" dtypes resolved here."""
    if (Path(final_dir) / POLICY_FILE).is_file():
        return PolicySpec.load(final_dir)
    return policy_spec(resolve_auto_dtypes(train_cfg))


def _greedy_matches(model, tok, spec: PolicySpec, trajectories: dict[str, list[dict]]) -> list[bool]:
    """Whether the evaluation's own deterministic policy (decoding, constraints and dtype, so the
    check is exact) takes the expert's action at each state, in trajectory order."""
    dtype = DTYPES[spec.dtype]
    if dtype != next(model.parameters()).dtype:  # the evaluation casts the fp32 weights the same way:
        model = copy.deepcopy(model)  # parameters only, as fsdp.summon_full_params(dtype) gives them
        for p in model.parameters():
            p.data = p.data.to(dtype)
    policy = spec.policy(model, tok)
    try:
        return agreement_matches(policy, trajectories, spec.batch_size)
    finally:
        policy.close()


def _expert_episodes(states: list[dict], tok, train_cfg, max_seq_len: int) -> list:
    """The expert episodes as token trees (`EpisodeExample`), their states in `states`' order."""
    return _episode_data(states, tok, train_cfg, max_seq_len)[0]


def _episode_prompts(states: list[dict], tok, train_cfg, max_seq_len: int) -> list[list[int]]:
    """Per-state prompt ids of the episode format, in `states`' order (every state must fit)."""
    return [e.prompt_ids for e in _episode_data(states, tok, train_cfg, max_seq_len)[1]]


def _episode_data(states: list[dict], tok, train_cfg, max_seq_len: int) -> tuple[list, list]:
    episodes, examples, dropped = build_episode_examples(
        states,
        tok,
        list_admissible=train_cfg.data.list_admissible,
        system_prompt=train_cfg.data.system_prompt,
        max_seq_len=max_seq_len,
    )
    if dropped:
        raise ValueError(f"{dropped} expert states of the eval games do not fit in max_seq_len={max_seq_len}")
    if [id(e.state) for e in examples] != [id(s) for s in states]:
        raise ValueError("expert trajectories must list each game's states in step order, games apart")
    return episodes, examples


def _sampled_success(model, tok, games, train_cfg, k, seed, device) -> dict:
    fsdp = apply_fsdp(model)  # world 1: collect_episodes gathers "full" weights through it
    rcfg = RolloutConfig(temperature=1.0, max_new_tokens=train_cfg.eval.max_new_tokens)
    eps, _ = collect_episodes(
        model,
        fsdp,
        tok,
        [g for g in games for _ in range(k)],
        rollout_cfg=rcfg,
        fmt=prompt_format(train_cfg.data),
        max_steps=train_cfg.eval.max_steps,
        max_seq_len=model.config.max_seq_len,
        seed=seed,
        device=device,
        num_workers=train_cfg.eval.num_workers,
    )
    return {"sampled_success": sum(e.won for e in eps) / max(len(eps), 1), "sampled_episodes": len(eps)}


def check_bound(res: dict, b: dict) -> dict:
    """Greedy: exact. Sampled: success + 2 binomial standard errors >= bound."""
    out = {"greedy_ok": res["success_rate"] + 1e-9 >= b["bound_greedy"]}
    if "sampled_success" in b:
        n, p = max(b["sampled_episodes"], 1), b["bound_sampled"]
        out["sampled_ok"] = b["sampled_success"] + 2 * math.sqrt(p * (1 - p) / n) + 1e-9 >= p
    return out
