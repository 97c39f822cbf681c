"""The paper's comparison: SFT vs multi-turn PPO vs trajectory-level GRPO vs single-turn GRPO.

`python -m trainer.compare --config configs/compare-tiny-cpu.toml` runs, for each seed:
  1. `sft-s<seed>`: SFT on the expert states (stages ["sft"]), evaluated multi-turn, exported;
  2. one run per RL method (`ppo`, `grpo-multiturn`, `grpo`) starting from that SFT checkpoint
     (model.path = sft-s<seed>/final) with the SAME SAMPLE BUDGET: `compare.sample_budget` sampled
     responses (one policy decision each). Single-turn GRPO draws batch_size * group_size per step
     exactly; a multi-turn rollout batch draws at most episodes_per_step * ppo.max_steps (episodes
     end early on success), so its step count is budget // that bound and the table reports the
     samples (and env steps) each method actually drew.
Every run goes through `trainer/main.py` (in-process, or `compare.launcher`, e.g. torchrun) with
the same data, tokenizer, eval games and evaluation; finished runs are reused (resumable driver).

Then, per evaluated checkpoint (each run's final/), the lower-bound check of the paper: along the
expert trajectory of every eval game, record p_t = pi(a*_t | s_t) (the probability of sampling
exactly the expert's action, T = 1) and g_t = 1{the evaluation's deterministic action == a*_t}
(its `eval.decoding`, greedy or ranked, under the same constraints). If the policy takes the
expert's action at every step it replays the expert's winning episode, so
    P(success) >= prod_t p_t   (sampling policy)      success_greedy >= prod_t g_t   (greedy)
averaged over games. The greedy check is exact against the evaluation's success; the sampling
check plays `bound_sampled_episodes` sampled episodes per game (a binomial 2-sigma margin).

Writes <out_dir>/comparison.md, comparison.json and plots/accuracy_vs_success.png.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import torch

from trainer.config import ConfigError, algo_stages, build_config

_REPO = Path(__file__).resolve().parents[1]
_RL = ("ppo", "grpo-multiturn", "grpo")
_NAMES = {
    "sft": "SFT",
    "ppo": "PPO (multi-turn)",
    "grpo-multiturn": "GRPO (multi-turn)",
    "grpo": "GRPO (single-turn)",
}


@dataclass(kw_only=True)
class CompareConfig:
    base: str = "configs/tiny-cpu.toml"
    """Train config the runs start from; the other sections of the compare file override it."""
    methods: list[str] = field(default_factory=lambda: ["sft", "ppo", "grpo-multiturn", "grpo"])
    """Rows of the table: 'sft' and the RL methods (which always start from the seed's SFT run)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds (model init, data order, sampling) of independent repeats."""
    sample_budget: int = 256
    """Sampled responses per RL method (the shared budget)."""
    out_dir: str = "runs/compare"
    """Where the runs, comparison.md/json and plots/ go."""
    launcher: str = ""
    """Command prefix for each run, e.g. 'torchrun --nproc_per_node=8' (empty: in this process)."""
    bound_sampled_episodes: int = 1
    """Sampled episodes per eval game for the sampling-policy bound check (0: greedy check only)."""

    def __post_init__(self):
        bad = [m for m in self.methods if m not in ("sft", *_RL)]
        if bad or not self.methods:
            raise ConfigError(f"compare.methods has unknown methods {bad}; choose from {['sft', *_RL]}")
        if not self.seeds or self.sample_budget <= 0 or self.bound_sampled_episodes < 0:
            raise ConfigError("compare: need seeds, sample_budget > 0, bound_sampled_episodes >= 0")

    @property
    def gpus(self) -> int:
        m = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", self.launcher)
        return int(m.group(1)) if m else 1


def load_compare_config(path: str | Path) -> tuple[CompareConfig, dict]:
    """(CompareConfig, the merged train-config sections) from a compare TOML."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    section = raw.pop("compare", {})
    types = typing.get_type_hints(CompareConfig)
    unknown = sorted(set(section) - set(types))
    if unknown:
        raise ConfigError(f"unknown compare keys {unknown}; keys: {sorted(types)}")
    cc = CompareConfig(**section)
    base_path = Path(cc.base) if Path(cc.base).is_absolute() else _REPO / cc.base
    with open(base_path, "rb") as f:
        train_raw = tomllib.load(f)
    for sec, values in raw.items():
        train_raw.setdefault(sec, {}).update(values)
    build_config(train_raw)  # validate the merged sections before any work
    return cc, train_raw


def _toml(raw: dict) -> str:
    lines = []
    for sec, values in raw.items():
        lines.append(f"[{sec}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def _merge(raw: dict, overrides: dict) -> dict:
    out = {k: dict(v) for k, v in raw.items()}
    for sec, values in overrides.items():
        out.setdefault(sec, {}).update(values)
    return out


def rl_steps(method: str, train_raw: dict, budget: int) -> tuple[int, int]:
    """(steps, max samples per step) that spend `budget` samples in method's RL stage."""
    cfg = build_config(train_raw)
    if method == "grpo":
        per = cfg.grpo.batch_size * cfg.grpo.oversample * cfg.rollout.group_size  # all drawn, kept or not
    else:
        per = cfg.ppo.episodes_per_step * cfg.ppo.max_steps
    return max(1, budget // per), per


@dataclass
class RunSpec:
    name: str
    method: str
    seed: int
    raw: dict


def sft_stages(train_raw: dict) -> list[str]:
    """The base config's stages before RL (e.g. ['lm', 'sft'] for from-scratch models), ending in 'sft'."""
    return algo_stages(build_config(train_raw).run.stages, "sft")


def plan_runs(cc: CompareConfig, train_raw: dict) -> list[RunSpec]:
    """The SFT run and the RL runs of every seed, in execution order."""
    out_dir = Path(cc.out_dir)
    specs = []
    for seed in cc.seeds:
        sft_name = f"sft-s{seed}"
        common = {"run": {"out_dir": str(out_dir), "seed": seed, "plots": False}, "data": {"seed": seed}}
        sft = _merge(train_raw, common)
        sft = _merge(
            sft, {"run": {"name": sft_name, "stages": sft_stages(train_raw)}, "model": {"init_seed": seed}}
        )
        sft["eval"] = {**sft.get("eval", {}), "random_baseline": seed == cc.seeds[0]}
        specs.append(RunSpec(sft_name, "sft", seed, sft))
        for method in (m for m in cc.methods if m != "sft"):
            steps, _ = rl_steps(method, train_raw, cc.sample_budget)
            section = "grpo" if method == "grpo" else "ppo"
            rl = _merge(train_raw, common)
            rl = _merge(
                rl,
                {
                    "run": {"name": f"{method}-s{seed}", "stages": [method]},
                    "model": {"path": str(out_dir / sft_name / "final")},
                    "eval": {"random_baseline": False},
                    section: {"steps": steps},
                },
            )
            specs.append(RunSpec(f"{method}-s{seed}", method, seed, rl))
    return specs


def _run(spec: RunSpec, cc: CompareConfig) -> None:
    """Train + evaluate one run (skipped when its eval and final/ exist)."""
    run_dir = Path(cc.out_dir) / spec.name
    if (run_dir / "eval" / f"{spec.method}.json").exists() and (run_dir / "final" / "config.json").exists():
        print(f"[compare] {spec.name}: done, reusing", flush=True)
        return
    cfg_path = Path(cc.out_dir) / "configs" / f"{spec.name}.toml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(_toml(spec.raw))
    print(f"[compare] {spec.name}: training ({cfg_path})", flush=True)
    if cc.launcher:
        cmd = [*shlex.split(cc.launcher), str(_REPO / "trainer" / "main.py"), "--config", str(cfg_path)]
        subprocess.run(cmd, check=True)
        return
    from trainer.main import main

    if main(["--config", str(cfg_path)]) != 0:
        raise RuntimeError(f"run {spec.name} failed (config {cfg_path})")


def _stage_rows(run_dir: Path, kind: str) -> list[dict]:
    from trainer.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if r.get("kind") == kind] if path.exists() else []


def collect_result(spec: RunSpec, cc: CompareConfig) -> dict:
    """One run's numbers: its eval report, samples / env steps drawn, wall-clock, tokens per GPU."""
    run_dir = Path(cc.out_dir) / spec.name
    rep = json.loads((run_dir / "eval" / f"{spec.method}.json").read_text())
    timings = (
        json.loads((run_dir / "timings.json").read_text()) if (run_dir / "timings.json").exists() else {}
    )
    kinds = sft_stages(spec.raw) if spec.method == "sft" else [spec.method]  # the SFT row pays for 'lm' too
    rows = [r for k in kinds for r in _stage_rows(run_dir, k)]
    cfg = build_config(spec.raw)
    if spec.method == "grpo":
        samples = sum(int(r.get("groups", 0)) * cfg.rollout.group_size for r in rows)
        env_steps = 0
    elif spec.method == "sft":
        samples = env_steps = 0
    else:
        samples = sum(int(r.get("samples", 0)) for r in rows)
        env_steps = sum(int(r.get("env_steps", 0)) for r in rows)
    tokens = sum(float(r.get("tokens_per_s", 0.0)) * float(r.get("time_train", 0.0)) for r in rows)
    return {
        "run": spec.name,
        "method": spec.method,
        "seed": spec.seed,
        "steps": len(rows),
        "stages": kinds,
        "success_rate": rep["success_rate"],
        "per_task": {t: v["success_rate"] for t, v in (rep.get("per_task") or {}).items()},
        "action_accuracy": rep.get("action_accuracy"),
        "mean_steps_success": rep.get("mean_steps_success"),
        "expert_mean_steps": rep.get("expert_mean_steps"),
        "invalid_action_rate": rep.get("invalid_action_rate"),
        "samples": samples,
        "env_steps": env_steps,
        "train_seconds": sum(timings.get(f"train/{k}", 0.0) for k in kinds) if timings else None,
        "eval_seconds": timings.get(f"eval/{spec.method}"),
        "tokens_per_gpu": tokens,
        "eval_games": [e["game"] for e in rep.get("episodes", [])],
    }


# ----------------------------------------------------------------------------- lower bound
def expert_trajectories(games: list[str], cache: Path, *, max_steps: int) -> dict[str, list[dict]]:
    """game -> the expert's states in step order (games the expert cannot win in max_steps: [])."""
    from harness import collect_states, read_states

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
    from harness import parse_action, render_prompt
    from model import Tokenizer, load_hf_checkpoint
    from trainer.data import pack_completions
    from trainer.policy import model_policy
    from trainer.sft import action_logprobs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, mcfg = load_hf_checkpoint(final_dir, device=device, dtype=torch.float32)
    tok = Tokenizer.from_file(str(final_dir / "tokenizer.json"))
    hw, ev = train_cfg.data.history_window, train_cfg.eval
    max_prompt = mcfg.max_seq_len - ev.max_new_tokens
    states = [s for g in trajectories for s in trajectories[g]]
    prompts = []
    for s in states:
        ids = list(
            tok.apply_chat_template(
                render_prompt(s, hw, train_cfg.data.system_prompt), add_generation_prompt=True
            )
        )
        prompts.append(ids[-max_prompt:])  # the same left truncation as the eval policy
    targets = [tok.encode(s["expert_action"]) + [tok.eot_id] for s in states]
    logp = []
    for i in range(0, len(states), 16):
        packed = pack_completions(prompts[i : i + 16], targets[i : i + 16], pad_id=tok.pad_id, device=device)
        lp = action_logprobs(model, lambda: model.output.weight, packed)  # (N,)
        logp.extend(
            torch.zeros(len(packed.tokens), dtype=torch.float64)
            .index_add_(0, packed.seq.cpu(), lp.double().cpu())
            .tolist()
        )
    # The evaluation's own deterministic policy (decoding and constraints), so the check is exact.
    policy = model_policy(
        model,
        tok,
        max_new_tokens=ev.max_new_tokens,
        max_seq_len=mcfg.max_seq_len,
        constrained=ev.constrained,
        decoding=ev.decoding,
    )
    messages = [render_prompt(s, hw, train_cfg.data.system_prompt) for s in states]
    kw = {"admissible": [s["admissible"] for s in states]} if policy.wants_admissible else {}
    texts = policy(messages, **kw) if states else []
    greedy = [parse_action(t, s["admissible"]) == s["expert_action"] for t, s in zip(texts, states)]
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
        if states
        else None,
        "greedy_step_accuracy": statistics.fmean(greedy) if greedy else None,
        "bound_sampled": sum(v["bound_sampled"] for v in per_game.values()) / n,
        "bound_greedy": sum(v["bound_greedy"] for v in per_game.values()) / n,
        "per_game": per_game,
    }
    if sampled_episodes > 0:
        out.update(
            _sampled_success(model, tok, list(trajectories), train_cfg, sampled_episodes, seed, device)
        )
    return out


def _sampled_success(model, tok, games, train_cfg, k, seed, device) -> dict:
    from trainer.config import RolloutConfig
    from trainer.fsdp import apply_fsdp
    from trainer.multiturn import collect_episodes

    fsdp = apply_fsdp(model)  # world 1: collect_episodes gathers "full" weights through it
    rcfg = RolloutConfig(temperature=1.0, max_new_tokens=train_cfg.eval.max_new_tokens)
    eps, _ = collect_episodes(
        model, fsdp, tok, [g for g in games for _ in range(k)], rollout_cfg=rcfg,
        history_window=train_cfg.data.history_window, system_prompt=train_cfg.data.system_prompt,
        max_steps=train_cfg.eval.max_steps,
        max_seq_len=model.config.max_seq_len, seed=seed, device=device, num_workers=train_cfg.eval.num_workers,
    )  # fmt: skip
    return {"sampled_success": sum(e.won for e in eps) / max(len(eps), 1), "sampled_episodes": len(eps)}


def check_bound(res: dict, b: dict) -> dict:
    """Greedy: exact. Sampled: success + 2 binomial standard errors >= bound."""
    out = {"greedy_ok": res["success_rate"] + 1e-9 >= b["bound_greedy"]}
    if "sampled_success" in b:
        n, p = max(b["sampled_episodes"], 1), b["bound_sampled"]
        out["sampled_ok"] = b["sampled_success"] + 2 * math.sqrt(p * (1 - p) / n) + 1e-9 >= p
    return out


# ----------------------------------------------------------------------------- report
def _mean_std(xs: list) -> tuple[float | None, float | None]:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _pct(m, s=None) -> str:
    if m is None:
        return "-"
    return f"{100 * m:.1f}%" + (f" ± {100 * s:.1f}" if s else "")


def _num(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def summarize(results: list[dict], cc: CompareConfig) -> dict:
    """Per method: mean and std over seeds of every column."""
    by_method: dict[str, list[dict]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    out = {}
    for method in cc.methods:
        rs = by_method.get(method, [])
        if not rs:
            continue
        tasks = sorted({t for r in rs for t in r["per_task"]})
        row = {"method": method, "seeds": [r["seed"] for r in rs]}
        for key in ("success_rate", "action_accuracy", "mean_steps_success", "expert_mean_steps",
                    "invalid_action_rate", "samples", "env_steps", "train_seconds", "tokens_per_gpu"):  # fmt: skip
            row[key] = _mean_std([r.get(key) for r in rs])
        row["per_task"] = {t: _mean_std([r["per_task"].get(t) for r in rs]) for t in tasks}
        out[method] = row
    return out


def to_markdown(summary: dict, results: list[dict], cc: CompareConfig, meta: dict) -> str:
    tasks = sorted({t for row in summary.values() for t in row["per_task"]})
    short = {t: t.replace("pick_and_place_simple", "pick").replace("look_at_obj_in_light", "look")
             .replace("pick_clean_then_place_in_recep", "clean").replace("pick_heat_then_place_in_recep", "heat")
             .replace("pick_cool_then_place_in_recep", "cool").replace("pick_two_obj_and_place", "pick2") for t in tasks}  # fmt: skip
    head = ["method", "success (± std over seeds)", *[short[t] for t in tasks], "action acc", "steps on wins (expert)",
            "invalid", "samples", "env steps", "train s", "tokens/GPU"]  # fmt: skip
    lines = [
        f"# Comparison ({meta['config']})",
        "",
        f"Seeds {cc.seeds}; every RL method starts from the seed's SFT checkpoint with a budget of "
        f"{cc.sample_budget} sampled responses (single-turn GRPO: exactly; multi-turn: at most, episodes end "
        f"early on success); {meta['eval_games']} held-out eval games, {meta['decoding']} decoding; {cc.gpus} GPU(s)/process(es) "
        f"per run; device {meta['device']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for method, row in summary.items():
        s = row["mean_steps_success"][0]
        e = row["expert_mean_steps"][0]
        cells = [_NAMES[method], _pct(*row["success_rate"])]
        cells += [_pct(*row["per_task"][t]) if t in row["per_task"] else "-" for t in tasks]
        cells += [_pct(row["action_accuracy"][0]), f"{_num(s)} ({_num(e)})", _pct(row["invalid_action_rate"][0]),
                  _num(row["samples"][0], "{:.0f}"), _num(row["env_steps"][0], "{:.0f}"),
                  _num(row["train_seconds"][0]), _num(row["tokens_per_gpu"][0], "{:.3g}")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Lower-bound check per checkpoint", "",
              "p_t = pi(expert action | expert state) at T=1 along the expert trajectories of the eval games; "
              "bound = mean over games of prod_t p_t (sampling) or prod_t 1{eval policy = expert} (greedy: the evaluation's deterministic decoding).", "",
              "| run | action acc | mean p_t | greedy step acc | greedy bound | greedy success | ok | sampled bound | sampled success | ok |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        b, c = r["bound"], r["bound_check"]
        lines.append(
            f"| {r['run']} | {_pct(r['action_accuracy'])} | {_num(b['mean_step_prob'], '{:.3f}')} | "
            f"{_pct(b['greedy_step_accuracy'])} | {_pct(b['bound_greedy'])} | {_pct(r['success_rate'])} | "
            f"{'yes' if c['greedy_ok'] else 'NO'} | {_num(b['bound_sampled'], '{:.2e}')} | "
            f"{_pct(b.get('sampled_success'))} | {'-' if 'sampled_ok' not in c else 'yes' if c['sampled_ok'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_success(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for method in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == method and r["action_accuracy"] is not None]
        ax.scatter([r["action_accuracy"] for r in rs], [r["success_rate"] for r in rs], label=_NAMES[method])
    xs = [i / 50 for i in range(51)]
    ax.plot(xs, xs, ":", color="gray", lw=0.8, label="y = x")
    ax.set_xlabel("action accuracy (vs expert, visited states)")
    ax.set_ylabel("multi-turn success rate")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("success vs action accuracy (one point per checkpoint)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_comparison(config_path: str) -> dict:
    """Run (or reuse) every run, the bound checks, and write comparison.md/json and the plot."""
    cc, train_raw = load_compare_config(config_path)
    out_dir = Path(cc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs = plan_runs(cc, train_raw)
    results = []
    for spec in specs:
        _run(spec, cc)
        if spec.method in cc.methods:
            results.append(collect_result(spec, cc))
    games = sorted({g for r in results for g in r["eval_games"]})
    train_cfg = build_config(train_raw)
    traj = expert_trajectories(
        games, out_dir / "bound-expert-states.jsonl", max_steps=train_cfg.eval.max_steps
    )
    for r in results:
        cache = out_dir / r["run"] / "eval" / "bound.json"
        if cache.exists():
            b = json.loads(cache.read_text())
        else:
            b = lower_bound(
                out_dir / r["run"] / "final",
                traj,
                train_cfg,
                sampled_episodes=cc.bound_sampled_episodes,
                seed=r["seed"],
            )
            cache.write_text(json.dumps(b, indent=1))
        r["bound"], r["bound_check"] = b, check_bound(r, b)
    summary = summarize(results, cc)
    meta = {
        "config": str(config_path),
        "eval_games": len(games),
        "decoding": train_cfg.eval.decoding
        + (
            " (admissible trie)" if train_cfg.eval.constrained and train_cfg.eval.decoding == "greedy" else ""
        ),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "seconds": round(time.perf_counter() - t0, 1),
        "budget_unit": "sampled responses (policy decisions)",
    }
    doc = {"meta": meta, "compare": asdict(cc), "summary": summary, "runs": results}
    (out_dir / "comparison.json").write_text(json.dumps(doc, indent=1))
    md = to_markdown(summary, results, cc, meta)
    (out_dir / "comparison.md").write_text(md)
    plot_accuracy_vs_success(results, out_dir / "plots" / "accuracy_vs_success.png")
    print(md, flush=True)
    return doc


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--config":
        print("usage: python -m trainer.compare --config configs/compare-tiny-cpu.toml", file=sys.stderr)
        return 2
    try:
        run_comparison(argv[1])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
