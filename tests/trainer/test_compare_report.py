"""trainer.compare's report on fixture eval JSONs (no training): success pooled over seeds with its
Wilson interval and per-seed values, valid_seen / valid_unseen apart, each method paired with SFT of
the same seed on the same games (wins / losses, exact McNemar p), the zero-shot row, the kept cost
columns, comparison.md and a JSON-ready summary. Every expected number is counted by hand below."""

import json
import shutil
from pathlib import Path

import pytest

from singleturn.trainer.compare import (
    collect_result,
    collect_zero_shot,
    load_compare_config,
    plan_runs,
    summarize,
    to_markdown,
)
from singleturn.trainer.stats import wilson_interval
from singleturn.trainer.table import pct

REPO = Path(__file__).resolve().parents[2]

COMPARE = """
[compare]
base = "{base}"
methods = ["sft", "ppo", "grpo"]
seeds = [0, 1]
sample_budget = 8
out_dir = "{out}"

[data]
games_dir = "{games}"
eval_splits = ["valid_seen", "valid_unseen"]

[grpo]
batch_size = 2
oversample = 1

[rollout]
group_size = 2
"""

SEEN = [f"s{i}" for i in range(6)]
UNSEEN = [f"u{i}" for i in range(4)]
# Won games per (run, seed); every run plays all 10 games. Counted by hand:
#   sft   s0: s0 s1          s1: s0 u0
#   grpo  s0: s0-s3 u0 (5)   s1: s0 s1 s2 u1 (4)   -> 9/20 pooled
#     vs sft s0: wins s2 s3 u0, both won s0 s1   | s1: wins s1 s2 u1, loss u0, both won s0
#     pooled: 6 wins / 1 loss, p = 2 (C(7,0) + C(7,1)) / 2^7 = 0.125; ties 3 won, 10 lost
#     valid_seen 7/12 (4 wins / 0 losses: p = 2/16); valid_unseen 2/8 (2 / 1: p = min(1, 2*4/8) = 1)
#   ppo   s0: s0 s1 (s5 an env failure)   s1: u0   -> 0 wins / 1 loss (s0 of seed 1): p = 1
#   zero-shot (sft-s0 only): none -> 0/10, 0 wins / 2 losses: p = 2 * 1/4 = 0.5
WON = {
    ("sft", 0): {"s0", "s1"},
    ("sft", 1): {"s0", "u0"},
    ("grpo", 0): {"s0", "s1", "s2", "s3", "u0"},
    ("grpo", 1): {"s0", "s1", "s2", "u1"},
    ("ppo", 0): {"s0", "s1"},
    ("ppo", 1): {"u0"},
    ("zero-shot", 0): set(),
}


def _game(games: Path, name: str) -> str:
    split = "valid_seen" if name.startswith("s") else "valid_unseen"
    return str(
        games / split / f"pick_and_place_simple-Mug-None-Desk-{name}" / f"trial_{name}" / "game.tw-pddl"
    )


def _report(games: Path, won: set[str], failed: set[str] = frozenset()) -> dict:
    eps = [
        {
            "game": _game(games, g),
            "task_type": "pick_and_place_simple",
            "won": g in won,
            "steps": 5 if g in won else 10,
            "invalid": 0,
            "matches": 3,
            "labeled": 5,
            "failed": g in failed,
            "error": "",
            "actions": [],
            "expert_steps": 4,
        }
        for g in SEEN + UNSEEN
    ]
    rate = len(won) / len(eps)
    return {
        "success_rate": rate,
        "per_task": {"pick_and_place_simple": {"episodes": len(eps), "success_rate": rate}},
        "action_accuracy": 0.6,
        "mean_steps_success": 5.0 if won else None,
        "expert_mean_steps": 4.0 if won else None,
        "invalid_action_rate": 0.1,
        "env_failures": len(failed),
        "episodes": eps,
        "meta": {},
    }


def _write(run_dir: Path, label: str, rep: dict) -> None:
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / f"{label}.json").write_text(json.dumps(rep))


@pytest.fixture
def comparison(tmp_path):
    games, out = tmp_path / "games", tmp_path / "cmp"
    cfg = tmp_path / "compare.toml"
    cfg.write_text(COMPARE.format(base=REPO / "configs/tiny-cpu.toml", out=out, games=games))
    cc, raw = load_compare_config(cfg)
    specs = plan_runs(cc, raw)
    for spec in specs:
        run_dir = out / spec.name
        (run_dir / "final").mkdir(parents=True)  # what the RL runs start from (model.path)
        (run_dir / "final" / "config.json").write_text("{}")
        (run_dir / "final" / "tokenizer.json").write_text("{}")
        failed = {"s5"} if (spec.method, spec.seed) == ("ppo", 0) else set()
        _write(run_dir, spec.method, _report(games, WON[spec.method, spec.seed], failed))
        rows = [{"kind": "grpo", "step": 1, "groups": 2, "time_train": 2.0, "tokens_per_s": 50.0}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "timings.json").write_text(json.dumps({f"train/{spec.method}": 3.0}))
    _write(out / "sft-s0", "zero-shot", _report(games, WON["zero-shot", 0]))
    results = [collect_result(s, cc) for s in specs]
    baselines = [b for s in specs if (b := collect_zero_shot(s, cc)) is not None]
    return cc, specs, results, baselines, games


def test_results_carry_per_episode_outcomes_and_splits(comparison):
    cc, specs, results, baselines, games = comparison
    assert [r["run"] for r in baselines] == ["sft-s0/zero-shot"], "zero-shot only where it was evaluated"
    grpo0 = next(r for r in results if r["run"] == "grpo-s0")
    assert [e["split"] for e in grpo0["episodes"]] == ["valid_seen"] * 6 + ["valid_unseen"] * 4
    assert {Path(e["game"]).parent.name for e in grpo0["episodes"] if e["won"]} == {
        "trial_s0",
        "trial_s1",
        "trial_s2",
        "trial_s3",
        "trial_u0",
    }
    ppo0 = next(r for r in results if r["run"] == "ppo-s0")
    assert ppo0["env_failures"] == 1 and [e["failed"] for e in ppo0["episodes"]].count(True) == 1
    assert grpo0["samples"] == 4 and grpo0["train_seconds"] == 3.0, "the kept cost columns"
    assert baselines[0]["samples"] is None and baselines[0]["train_seconds"] is None


def test_summary_pools_seeds_splits_and_pairs_with_sft(comparison):
    cc, specs, results, baselines, games = comparison
    summary = summarize(results + baselines, cc)
    assert list(summary) == ["zero-shot", "sft", "ppo", "grpo"]
    g = summary["grpo"]
    assert (g["success"]["all"]["successes"], g["success"]["all"]["episodes"]) == (9, 20)
    assert g["success"]["all"]["ci95"] == list(wilson_interval(9, 20))
    assert {s: v["rate"] for s, v in g["success"]["all"]["per_seed"].items()} == {0: 0.5, 1: 0.4}
    assert (g["success"]["valid_seen"]["successes"], g["success"]["valid_seen"]["episodes"]) == (7, 12)
    assert (g["success"]["valid_unseen"]["successes"], g["success"]["valid_unseen"]["episodes"]) == (2, 8)
    v = g["vs_sft"]["all"]
    assert (v["wins"], v["losses"], v["ties_success"], v["ties_fail"], v["n"]) == (6, 1, 3, 10, 20)
    assert v["p"] == 0.125
    assert (v["per_seed"][0]["wins"], v["per_seed"][0]["losses"]) == (3, 0)
    assert (v["per_seed"][1]["wins"], v["per_seed"][1]["losses"]) == (3, 1)
    assert (g["vs_sft"]["valid_seen"]["wins"], g["vs_sft"]["valid_seen"]["losses"]) == (4, 0)
    assert g["vs_sft"]["valid_seen"]["p"] == 0.125
    assert (g["vs_sft"]["valid_unseen"]["wins"], g["vs_sft"]["valid_unseen"]["losses"]) == (2, 1)
    assert g["vs_sft"]["valid_unseen"]["p"] == 1.0
    p, vp = summary["ppo"], summary["ppo"]["vs_sft"]["all"]
    assert (p["success"]["all"]["successes"], vp["wins"], vp["losses"], vp["p"]) == (3, 0, 1, 1.0)
    assert p["env_failures_total"] == 1
    z, vz = summary["zero-shot"], summary["zero-shot"]["vs_sft"]["all"]
    assert (
        z["seeds"] == [0] and z["success"]["all"]["episodes"] == 10 and z["success"]["all"]["ci95"][0] == 0.0
    )
    assert (vz["wins"], vz["losses"], vz["p"]) == (0, 2, 0.5)
    assert "vs_sft" not in summary["sft"]
    assert summary["sft"]["success_rate"] == (0.2, 0.0), "the mean / std over seeds stays"
    assert json.loads(json.dumps(summary))["grpo"]["success"]["all"]["per_seed"]["1"]["successes"] == 4


def test_markdown_shows_intervals_seeds_splits_and_paired_test(comparison):
    cc, specs, results, baselines, games = comparison
    for r in results:  # the lower-bound section needs a bound per trained checkpoint
        r["bound"] = {
            "mean_step_prob": 0.5,
            "greedy_step_accuracy": 0.6 if r["seed"] == 0 else 0.9,
            "bound_greedy": 0.1,
            "bound_sampled": 0.01,
            "sampled_success": 0.2,
        }
        r["bound_check"] = {"greedy_ok": True, "sampled_ok": True}
    meta = {"config": "fixture.toml", "eval_games": 10, "decoding": "rank", "device": "cpu"}
    md = to_markdown(summarize(results + baselines, cc), results, cc, meta)
    # 9/20: center (0.45 + z^2/40) / (1 + z^2/20), half z / (1 + z^2/20) sqrt(0.45 * 0.55 / 20 + z^2/1600)
    #   = 0.45806 -+ 0.19986: [25.8%, 65.8%]; likewise 7/12 seen: 0.56313 -+ 0.24361 = [32.0, 80.7];
    #   2/8 unseen: 0.33110 -+ 0.25962 = [7.1, 59.1]; 0/10 zero-shot: high z^2 / (10 + z^2) = 27.8%.
    row = next(line for line in md.splitlines() if line.startswith("| GRPO (single-turn) | 45.0%"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "GRPO (single-turn)",
        "45.0% [25.8, 65.8] (9/20)",
        "s0 50.0%, s1 40.0%",
        "58.3% [32.0, 80.7] (7/12)",
        "25.0% [7.1, 59.1] (2/8)",
        "6 / 1 (3, 10)",
        "0.125",
    ], cells
    head = next(line for line in md.splitlines() if line.startswith("| method | success"))
    assert "valid_seen | valid_unseen" in head
    sft_row = next(line for line in md.splitlines() if line.startswith("| SFT | "))
    assert sft_row.rstrip().endswith("| - | - |"), "SFT is the reference, not paired with itself"
    assert any(
        line.startswith("| zero-shot (no fine-tuning) | 0.0% [0.0, 27.8] (0/10) | s0 0.0%")
        for line in md.splitlines()
    )
    cost = next(line for line in md.splitlines() if line.startswith("| PPO (multi-turn) | 15.0% ± 7.1 |"))
    assert "| 1/20 |" in cost, "env failures over all seeds' episodes"
    head = next(
        line for line in md.splitlines() if line.startswith("| method | ") and "teacher-forced" in line
    )
    col = dict(
        zip([c.strip() for c in head.strip("|").split("|")], [c.strip() for c in cost.strip("|").split("|")])
    )
    assert col["teacher-forced acc"] == "75.0%", "the bound's step accuracy, mean over seeds"
    assert col["acc on visited states"] == pct(
        summarize(results + baselines, cc)["ppo"]["action_accuracy"][0]
    )
    zero = [line for line in md.splitlines() if line.startswith("| zero-shot (no fine-tuning) | ")][-1]
    zcol = dict(zip(col, [c.strip() for c in zero.strip("|").split("|")]))
    assert zcol["teacher-forced acc"] == "-", "no bound for the untrained start"
    assert "Lower-bound check" in md and "| grpo-s1 |" in md


META = {"config": "fixture.toml", "eval_games": 10, "decoding": "rank", "device": "cpu"}


def _with_bounds(results: list[dict]) -> list[dict]:
    for r in results:
        r["bound"] = {
            "mean_step_prob": 0.5,
            "greedy_step_accuracy": 0.6,
            "bound_greedy": 0.1,
            "bound_sampled": 0.01,
        }
        r["bound_check"] = {"greedy_ok": True, "sampled_ok": True}
    return results


def test_held_out_agreement_column_is_each_runs_last_holdout_row_in_its_own_stages(comparison, tmp_path):
    cc, specs, results, baselines, games = comparison
    results = _with_bounds(results)
    md = to_markdown(summarize(results + baselines, cc), results, cc, META)
    assert "held-out agreement" not in md, "no column when no run measured it"
    out = Path(cc.out_dir)
    # ppo-s0: a row of another stage (ignored) and two of its own (the last counts); ppo-s1 its own
    extra = {
        "ppo-s0": [("sft", 3, 0.1), ("ppo", 2, 0.5), ("ppo", 4, 0.7)],
        "ppo-s1": [("ppo", 4, 0.8)],
    }
    for run, rows in extra.items():
        with (out / run / "metrics.jsonl").open("a") as f:
            for stage, step, a in rows:
                f.write(json.dumps({"kind": "holdout", "stage": stage, "step": step, "agreement": a}) + "\n")
    results = _with_bounds([collect_result(s, cc) for s in specs])
    got = {r["run"]: r["holdout_agreement"] for r in results}
    assert got["ppo-s0"] == 0.7 and got["ppo-s1"] == 0.8 and got["sft-s0"] is None
    md = to_markdown(summarize(results + baselines, cc), results, cc, META)
    head = next(line for line in md.splitlines() if line.startswith("| method | ") and "held-out" in line)
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    ppo = next(line for line in md.splitlines() if line.startswith("| PPO (multi-turn) | 15.0% ± 7.1 |"))
    sft = [line for line in md.splitlines() if line.startswith("| SFT | ")][-1]  # the cost table's
    assert dict(zip(cells(head), cells(ppo)))["held-out agreement"] == "75.0%", "mean over seeds"
    assert dict(zip(cells(head), cells(sft)))["held-out agreement"] == "-"


def test_pairing_refuses_different_games(comparison):
    cc, specs, results, baselines, games = comparison
    grpo1 = next(r for r in results if r["run"] == "grpo-s1")
    dropped = grpo1["episodes"].pop()
    with pytest.raises(ValueError, match="only in B") as e:
        summarize(results, cc)
    assert "trial_u3" in str(e.value), "the error names the game"
    grpo1["episodes"] += [dropped, dict(dropped)]
    with pytest.raises(ValueError, match="evaluated twice"):
        summarize(results, cc)


@pytest.mark.parametrize("pretrained, want", [(False, [True, True]), (True, [True, False])])
def test_zero_shot_is_evaluated_once_for_a_shared_pretrained_start(tmp_path, pretrained, want):
    """A pre-trained start is one model for every seed (deterministic decoding): only the first seed's
    SFT run evaluates it. From scratch (no model.path) each seed's initialization is its own."""
    cfg = tmp_path / "compare.toml"
    (tmp_path / "ckpt").mkdir()
    for name in ("config.json", "tokenizer.json"):  # plan_runs checks that they exist, reads neither
        (tmp_path / "ckpt" / name).write_text("{}")
    extra = f'\n[eval]\nzero_shot = true\n\n[model]\npath = "{tmp_path / "ckpt" if pretrained else ""}"\n'
    cfg.write_text(
        COMPARE.format(base=REPO / "configs/tiny-cpu.toml", out=tmp_path / "o", games=tmp_path) + extra
    )
    cc, raw = load_compare_config(cfg)
    sft = [s for s in plan_runs(cc, raw) if s.method == "sft"]
    assert [s.raw["eval"]["zero_shot"] for s in sft] == want
    assert [s.raw["eval"]["random_baseline"] for s in sft] == [True, False]
    rl = [s for s in plan_runs(cc, raw) if s.method != "sft"]  # their start is SFT's row: never re-evaluated
    assert rl and not any(s.raw["eval"]["zero_shot"] or s.raw["eval"]["random_baseline"] for s in rl)


def test_accuracy_plot_has_both_accuracies(comparison, tmp_path):
    """One point per checkpoint in each panel: teacher-forced needs the bound (absent: left out)."""
    from singleturn.trainer.compare_report import plot_accuracy_vs_success

    cc, specs, results, baselines, games = comparison
    for r in results[1:]:
        r["bound"] = {"greedy_step_accuracy": 0.5}
    results[0].pop("bound", None)
    path = plot_accuracy_vs_success(results, tmp_path / "plots" / "acc.png")
    assert path.stat().st_size > 5000


@pytest.mark.parametrize("rc", [143, 130, 1])
def test_an_interrupted_run_stops_the_comparison_with_its_code(comparison, monkeypatch, capsys, rc):
    """SIGTERM / SIGINT inside a run (it saved a checkpoint, exit 128 + signal): the driver stops
    with the same code and says how to resume; any other failure is an error naming the run."""
    import singleturn.trainer.compare as compare

    cc, specs, results, baselines, games = comparison
    monkeypatch.setattr(compare, "train_main", lambda args: rc)
    spec = next(s for s in specs if s.name == "grpo-s1")
    shutil.rmtree(Path(cc.out_dir) / spec.name / "final", ignore_errors=True)  # not finished: it runs
    if rc == 1:
        with pytest.raises(RuntimeError, match="run grpo-s1 failed \\(exit 1"):
            compare._run(spec, cc)
        return
    with pytest.raises(SystemExit) as e:
        compare._run(spec, cc)
    assert e.value.code == rc
    assert (
        "grpo-s1: interrupted after a checkpoint; re-run the same command to resume"
        in capsys.readouterr().out
    )
