"""The throughput benchmarks run on CPU at tiny sizes (so they never rot), and bench/flops.py counts right.

FLOP counts are checked against `torch.utils.flop_counter.FlopCounterMode` on the real model (the
matmuls of the blocks and of the LM head, forward and forward + backward) and against brute-force
pair counts for attention; the decode byte count against the model's parameter and KV-cache sizes.
The scripts run as subprocesses (`python bench/X.py`, which is how users and bench/device_run.sh run
them: bench/ is then sys.path[0]) with one intra-op thread, and their JSONL/markdown outputs are checked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from singleturn.model import LlamaConfig, Transformer

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def _load_flops():
    spec = importlib.util.spec_from_file_location("bench_flops", BENCH / "flops.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


flops = _load_flops()


def _small_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_dim=96, tie_word_embeddings=tied
    )


def _mm_flops(counter: FlopCounterMode) -> int:
    # nn.Linear lowers to mm/addmm; attention (SDPA, bmm) is checked separately below.
    counts = counter.get_flop_counts()["Global"]
    return sum(v for k, v in counts.items() if str(k).split(".")[-1] in ("mm", "addmm"))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("seq_lens", [[7], [5, 13]])
def test_matmul_flops_match_flop_counter(tied, seq_lens):
    """Blocks on every token + LM head on the gathered tokens, forward and forward + backward."""
    torch.manual_seed(0)
    config = _small_config(tied)
    model = Transformer(config)
    head_tokens = 0
    fwd = fwd_bwd = 0
    for T in seq_lens:  # one sequence at a time: no padding, so counted tokens = computed tokens
        tokens = torch.randint(0, config.vocab_size, (1, T))
        cols = torch.arange(T // 2, T)  # the "response" positions that go through the head
        head_tokens += len(cols)
        with FlopCounterMode(display=False) as fc:
            h = model.hidden(tokens)[0, cols]  # (n, D)
            logits = h @ model.output.weight.T  # (n, V): the head, as the fused kernel computes it
        fwd += _mm_flops(fc)
        with FlopCounterMode(display=False) as fc:
            h = model.hidden(tokens)[0, cols]
            (h @ model.output.weight.T).logsumexp(-1).sum().backward()
        fwd_bwd += _mm_flops(fc)
        del logits
    attn = sum(flops.attention_flops(config, t) for t in seq_lens)
    want_fwd = flops.forward_flops(config, seq_lens, head_tokens=head_tokens) - attn
    assert fwd == want_fwd, f"forward matmul FLOPs: counted {fwd}, formula {want_fwd}"
    want_train = flops.train_flops(config, seq_lens, head_tokens=head_tokens) - 3 * attn
    assert fwd_bwd == want_train, f"fwd+bwd matmul FLOPs: counted {fwd_bwd}, formula {want_train}"


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 37), (5, 5), (13, 40), (37, 37)])
def test_attention_flops(q_len, kv_len):
    config = _small_config(True)
    H, hd, L = config.n_heads, config.head_dim, config.n_layers
    # causal: brute-force pair count (query i of the last q_len positions sees keys 0..kv_len-q_len+i)
    pairs = sum(kv_len - q_len + i + 1 for i in range(q_len))
    got = flops.attention_flops(config, q_len, kv_len=kv_len)
    assert got == 4 * L * H * hd * pairs, (got, pairs)
    # non-causal: QK^T and PV as explicit matmuls under the FLOP counter, per layer
    q, k, v = torch.randn(1, H, q_len, hd), torch.randn(1, H, kv_len, hd), torch.randn(1, H, kv_len, hd)
    with FlopCounterMode(display=False) as fc:
        (q @ k.transpose(-1, -2)).softmax(-1) @ v
    want = L * fc.get_total_flops()
    assert flops.attention_flops(config, q_len, kv_len=kv_len, causal=False) == want


@pytest.mark.parametrize("tied", [True, False])
def test_decode_step_bytes_match_model_and_cache_sizes(tied):
    config = _small_config(tied)
    model = Transformer(config).to(torch.bfloat16)
    batch, ctx = 3, 11
    params = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    weights = params - (0 if tied else config.vocab_size * config.dim - batch * config.dim)
    model.setup_caches(batch, ctx)
    cache = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("kv_cache.k", "kv_cache.v")))
    model.clear_caches()
    got = flops.decode_step_bytes(config, [ctx] * batch, param_bytes=2, kv_bytes=2)
    assert got == 2 * (weights + cache), (got, 2 * weights, 2 * cache)


def test_device_peak_lookup():
    assert flops.device_peak("NVIDIA H100 80GB HBM3").bf16_tflops == pytest.approx(989.4)
    assert flops.device_peak("NVIDIA H100 PCIe").bf16_tflops == pytest.approx(756.0)
    assert flops.device_peak("NVIDIA H200").hbm_gbps == pytest.approx(4800.0)
    assert flops.device_peak("NVIDIA A100-SXM4-40GB").hbm_gbps == pytest.approx(1555.0)
    assert flops.device_peak("cpu") is None


def test_no_bench_profile_module_shadows_stdlib():
    # A bench/profile.py would be imported as `profile` by cProfile (torch._dynamo imports it) in every
    # script run from bench/; the profiler lives in bench/profile_steps.py for that reason.
    assert not (BENCH / "profile.py").exists()


def _run(script: str, *args: str) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }  # oversubscribed OMP threads spin
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--device", "cpu", "--quick", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_bench_train_step_cpu(tmp_path):
    args = ("--prompt-len", "24", "--response-len", "6", "--warmup", "0", "--steps", "1")
    _run("bench_train_step.py", "--out-dir", str(tmp_path), *args)
    rows = [r for r in _rows(next(tmp_path.glob("*.jsonl"))) if r.get("bench") == "train_step"]
    assert {r["algo"] for r in rows} == {"grpo", "sft"}
    for r in rows:
        # quick tiny defaults: 2 states x G=4 sequences of prompt + response per rank
        assert r["tokens_per_step_per_gpu"] == 2 * 4 * (24 + 6), r
        assert r["tokens_per_s_per_gpu"] > 0 and r["step_s"] > 0
        assert r["time_fwd_bwd_s"] > 0 and r["time_optimizer_s"] > 0
        assert 0 < r["mfu_train_measured"] < 2, r["mfu_train_measured"]  # vs the fp32 CPU matmul peak
    grpo = next(r for r in rows if r["algo"] == "grpo")
    assert grpo["time_rollout_s"] > grpo["time_rollout_prefill_s"] > 0 and grpo["time_rollout_gather_s"] > 0
    parts = sum(grpo[f"time_{k}_s"] for k in ("rollout", "fwd_bwd", "optimizer", "other"))
    assert parts == pytest.approx(grpo["step_s"], rel=1e-6), (parts, grpo["step_s"])  # one timed step
    assert grpo["tflops_step_per_gpu"] > 0
    assert any(p.suffix == ".md" for p in tmp_path.iterdir())


def test_bench_rollout_cpu(tmp_path):
    _run("bench_rollout.py", "--out-dir", str(tmp_path), "--cpu-smoke")  # the kernels benches' flag too
    rows = [r for r in _rows(next(tmp_path.glob("*.jsonl"))) if r.get("bench") == "rollout"]
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert not r.get("error"), r
        assert r["decode_tokens_per_s"] > 0 and r["decode_gbps_static_cache"] >= r["decode_gbps"] > 0
        assert r["generate_s"] > r["prefill_s"] > 0
    (turns,) = [r for r in _rows(next(tmp_path.glob("*.jsonl"))) if r.get("bench") == "rollout_turns"]
    assert turns["single_turn_tokens_per_s"] > 0 and turns["multi_turn_tokens_per_s"] > 0
    assert turns["single_over_multi"] == pytest.approx(turns["multi_turn_s"] / turns["single_turn_s"])


def test_bench_rollout_memory_cpu(tmp_path):
    """Two bounds on the tiny preset: none (one chunk) and 2 MiB (chunks, each cache within the bound)."""
    _run("bench_rollout_memory.py", "--out-dir", str(tmp_path), "--cpu-smoke")
    rows = _rows(tmp_path / "rollout_memory.jsonl")
    assert [r["max_cache_mb"] for r in rows] == [0, 2]
    unbounded, bounded = rows
    assert unbounded["chunks"] == 1 and bounded["chunks"] > 1
    assert bounded["largest_cache_gib"] * 2**30 <= 2 << 20 < unbounded["largest_cache_gib"] * 2**30
    for r in rows:
        assert r["generate_s"] > 0 and r["peak_rss_gib"] > 0 and r["device"] == "cpu"
    assert (tmp_path / "rollout_memory.md").is_file()


def test_profile_steps_cpu(tmp_path):
    out = _run(
        "profile_steps.py",
        "--run-dir",
        str(tmp_path),
        "--algo",
        "sft",
        "--top",
        "10",
        "--warmup",
        "1",
        "--steps",
        "1",
    )
    trace = json.loads((tmp_path / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "phase/fwd_bwd" in names and "phase/optimizer" in names
    rows = _rows(tmp_path / "top_kernels_rank0.jsonl")
    assert 0 < len(rows) <= 10 and any(r["name"] == "aten::mm" for r in rows)
    assert "aten::mm" in out


@pytest.mark.slow
def test_bench_train_step_two_ranks_cpu(tmp_path):
    """torchrun with 2 gloo ranks, a reference model (kl_coef > 0) and activation checkpointing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["--cpu-smoke", "--out-dir", str(tmp_path), "--warmup", "0", "--steps", "1", "--kl-coef", "0.05"]
    args += ["--activation-checkpointing", "--prompt-len", "24", "--response-len", "6"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(BENCH / "bench_train_step.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = _rows(tmp_path / "train_step.jsonl")
    assert len(rows) == 2 and all(r["world_size"] == 2 and not r.get("error") for r in rows), rows
    grpo = next(r for r in rows if r["algo"] == "grpo")
    assert grpo["time_ref_logprobs_s"] > 0 and grpo["tokens_per_step_per_gpu"] == 2 * 4 * 30


def test_bench_prefix_sharing_cpu(tmp_path):
    _run("bench_prefix_sharing.py", "--out-dir", str(tmp_path), "--cpu-smoke")
    rows = _rows(tmp_path / "prefix_sharing_cpu.jsonl")
    by = {(r["job"], r["layout"]): r for r in rows}
    assert set(by) == {("grpo", "padded"), ("grpo", "shared"), ("sft", "padded"), ("sft", "packed")}
    pad, shared = by["grpo", "padded"], by["grpo", "shared"]
    # smoke: one group of G=4, prompt 40: padded = 4 rows of prompt + longest response; shared = 1 row, no pad
    assert shared["tokens_computed"] == shared["tokens_useful"] == pad["tokens_useful"]
    assert pad["tokens_computed"] % 4 == 0 and pad["tokens_computed"] >= 4 * 41
    assert shared["tokens_ratio"] == pytest.approx(pad["tokens_computed"] / shared["tokens_computed"])
    for r in rows:
        assert r["ms_median"] > 0 and r["mem_peak_mb"] > 0 and r["git_sha"]
        if r["layout"] != "padded":  # fp32: the layouts compute the same loss
            assert r["loss_rel_diff"] < 1e-5, r
            assert r["speedup"] == pytest.approx(by[r["job"], "padded"]["ms_median"] / r["ms_median"])
    assert by["sft", "packed"]["tokens_computed"] == by["sft", "packed"]["tokens_useful"]
    assert "| shared |" in (tmp_path / "prefix_sharing_cpu.md").read_text()


def test_bench_grpo_tokens_on_synthetic_episodes(tmp_path):
    """The GRPO token-count bench on the synthetic episodic states: drawing episode by episode with
    prefix chains computes fewer tokens than a segment per group of the same prompts."""
    from singleturn.trainer.synthetic import write_synthetic_inputs

    states, tok = write_synthetic_inputs(tmp_path, n=30, episodic=True)
    _run(
        "bench_grpo_tokens.py",
        "--out-dir",
        str(tmp_path),
        "--tokenizer",
        str(tok),
        "--states",
        str(states),
        "--steps",
        "3",
        "--batch",
        "6",
        "--group-size",
        "2",
        "--response-len",
        "3",
    )
    by_path = {r["path"]: r for r in _rows(tmp_path / "grpo_tokens.jsonl")}
    rows = {p: r["tokens"] for p, r in by_path.items()}
    assert (
        rows["episode prompt, prefix chains, episode by episode"] < rows["episode prompt, segment per group"]
    )
    # the rollout prefills only trunks: fewer tokens where a step's prompts chain, the same where none do
    chained = by_path["episode prompt, prefix chains, episode by episode"]
    assert chained["prefill_trunks"] < chained["prefill_per_prompt"]
    window = by_path["window prompt, segment per group"]
    assert window["prefill_trunks"] == window["prefill_per_prompt"]


def _tiny_checkpoint(tmp_path):
    """(states, checkpoint dir): the synthetic episodic states and a tiny random model over their
    tokenizer, exported as an HF directory with its tokenizer (what the checkpoint benches read)."""
    from singleturn.model import save_hf_checkpoint
    from singleturn.model.tokenizer import Tokenizer
    from singleturn.trainer.synthetic import write_synthetic_inputs

    states, tok_path = write_synthetic_inputs(tmp_path, n=30, episodic=True)
    tok = Tokenizer.from_file(str(tok_path))
    cfg = LlamaConfig(
        dim=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        ffn_dim=64,
        vocab_size=tok.vocab_size,
        max_seq_len=1024,
        tie_word_embeddings=True,
        bos_id=tok.bos_id,
        eos_ids=(tok.eot_id,),
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    ckpt = tmp_path / "ckpt"
    save_hf_checkpoint(model, ckpt)
    (ckpt / "tokenizer.json").write_bytes(tok_path.read_bytes())
    return states, ckpt


def test_episode_prompt_selection_smoke(tmp_path):
    """The item-3 measurement end to end on a tiny random model and the synthetic episodes: both
    variants, zero-shot and after SFT, agreement and costs per state."""
    states, ckpt = _tiny_checkpoint(tmp_path)
    _run(
        "episode_prompt_selection.py",
        "--out-dir",
        str(tmp_path),
        "--model",
        str(ckpt),
        "--states",
        str(states),
        "--held-out-games",
        "3",
        "--sft-episodes",
        "4",
        "--batch-episodes",
        "2",
        "--threads",
        "1",
    )
    rows = _rows(tmp_path / "episode_prompt_selection.jsonl")
    assert [(r["variant"], r["when"].split(" (")[0]) for r in rows] == [
        ("none", "zero-shot"),
        ("none", "after SFT"),
        ("list", "zero-shot"),
        ("list", "after SFT"),
    ]
    assert all(r["states"] == 9 and 0 <= r["agreement"] <= 1 for r in rows)
    after = {r["variant"]: r for r in rows if r["when"].startswith("after")}
    assert after["list"]["sft_tokens_per_state"] > after["none"]["sft_tokens_per_state"]


def test_decoding_agreement_smoke(tmp_path):
    """Ranked vs trie-greedy on the episodes a recorded SFT run never drew: the exclusion is exact
    (the SFT batches recomputed from the data seed), both decodings score the same states, and
    ranking agrees with itself."""
    states, ckpt = _tiny_checkpoint(tmp_path)
    _run(
        "decoding_agreement.py",
        "--out-dir",
        str(tmp_path),
        "--checkpoint",
        str(ckpt),
        "--states",
        str(states),
        "--sft-steps",
        "2",
        "--sft-batch",
        "2",
        "--games",
        "3",
        "--threads",
        "1",
    )
    rows = {r["decoding"]: r for r in _rows(tmp_path / "decoding_agreement.jsonl")}
    assert list(rows) == ["rank", "greedy"]
    # 10 synthetic episodes of 3 states; 2 SFT steps x 2 episodes draw 4 of them; 3 of the other 6 scored
    assert {(r["games"], r["states"]) for r in rows.values()} == {(3, 9)}
    assert rows["rank"]["same_as_rank"] == 1.0
    assert 0 <= rows["greedy"]["same_as_rank"] <= 1 and 0 <= rows["greedy"]["agreement"] <= 1
    assert rows["greedy"]["tokens_per_state"] < rows["rank"]["tokens_per_state"]
    assert (rows["rank"]["vs_rank"], rows["rank"]["mcnemar_p"]) == ("0 / 0", 1.0)
    only_it, only_rank = map(int, rows["greedy"]["vs_rank"].split(" / "))
    n = rows["rank"]["states"]  # the paired counts are the agreement's difference, state by state
    assert only_it - only_rank == round(n * rows["greedy"]["agreement"]) - round(
        n * rows["rank"]["agreement"]
    )


def test_profile_eval_summary_by_hand(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # bench/ scripts import as top-level modules; restored after
    import profile_eval

    path = tmp_path / "p.jsonl"
    rows = [
        {"op": "append", "B": 4, "T": 10, "real": 16, "live": 4, "kv": 100, "s": 0.5},
        {"op": "append", "B": 2, "T": 3, "real": 4, "live": 2, "kv": 300, "s": 0.5},
        {"op": "score", "B": 1, "T": 5, "real": 5, "live": 1, "kv": 50, "s": 0.25},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    append, score = profile_eval.summarize(str(path))
    # append: 40 + 6 = 46 padded for 20 real (2.30x), 1 s / 20 tokens = 50 ms, kv (100 + 300) / 2
    assert append == (
        "append: 2 calls, 1.0 s, 20 real tokens, 46 padded to the longest row (2.30x), "
        "50.00 ms per real token, mean kv 200"
    )
    assert score.startswith("score: 1 calls, 0.2 s, 5 real tokens, 5 padded to the longest row (1.00x)")


def test_bench_episodes_cpu(tmp_path):
    """Both engine modes over rows of different lengths score what the cache-free path scores (fp32)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(BENCH / "bench_episodes.py"), "--cpu-smoke", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["path"]: r for r in _rows(tmp_path / "episodes.jsonl")}
    assert len(rows) == 7 and all(r["spread"] == 40 and r["ms_per_step"] > 0 for r in rows.values())
    for mode in ("padded", "packed"):
        assert rows[f"episode-cache {mode}, suffix=none"]["max_score_diff"] < 1e-4
        for what in ("suffix=admissible", "suffix=none", "greedy"):  # the modes compute the same tokens
            assert (
                rows[f"episode-cache {mode}, {what}"]["tokens_per_step"]
                == rows[f"episode-cache padded, {what}"]["tokens_per_step"]
            )
