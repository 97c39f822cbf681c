"""KV-cache decoding and `generate`: cache == full forward, greedy == HF greedy, shared prefill,
seeded sampling, stop ids, and log-probs equal to a teacher-forced recomputation."""

import pytest
import torch

from singleturn.model.generate import Samples, generate, kv_cache_bytes, plan_chunks

PROMPT_LENS = [5, 9, 3]
V = 1003


def _prompts(seed=0, lens=PROMPT_LENS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_kv_cache_decode_equals_full_forward(hf_pair, n_kv_heads):
    _, model = hf_pair(seed=5, n_kv_heads=n_kv_heads)
    k = 6
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, V, (n + k,), generator=g) for n in PROMPT_LENS]
    B, max_len = len(seqs), max(PROMPT_LENS)
    prompt = torch.zeros(B, max_len, dtype=torch.int64)  # right-padded with 0
    for b, n in enumerate(PROMPT_LENS):
        prompt[b, :n] = seqs[b][:n]
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]  # per row, no padding: (n + k, V)
        model.setup_caches(B, max_len + k)
        pre = model(prompt)  # (B, max_len, V)
        for b, n in enumerate(PROMPT_LENS):
            err = (pre[b, :n] - full[b][:n]).abs().max().item()
            assert err <= 1e-5, f"prefill row {b}: error {err:.3e}"
        pos = torch.tensor(PROMPT_LENS)
        for j in range(k):
            tok = torch.stack([s[n + j] for s, n in zip(seqs, PROMPT_LENS)])
            step = model(tok[:, None], input_pos=(pos + j)[:, None])[:, 0]  # (B, V)
            for b, n in enumerate(PROMPT_LENS):
                err = (step[b] - full[b][n + j]).abs().max().item()
                assert err <= 1e-5, f"decode step {j} row {b}: error {err:.3e}"
        model.clear_caches()
    assert all(layer.attention.kv_cache is None for layer in model.layers)
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(tok[:, None], input_pos=pos[:, None])


def test_greedy_equals_hf_generate(hf_pair):
    hf, model = hf_pair(seed=6, n_kv_heads=2, tie=True)
    prompts = _prompts(1)
    out = generate(model, prompts, num_samples=2, max_new_tokens=12, temperature=0.0, stop_ids=(2,))
    assert out.tokens.shape == (6, 12) and out.tokens.dtype == torch.int64
    assert out.logprobs.dtype == torch.float32 and torch.all(out.logprobs == 0)
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p) :]
        for r in (2 * i, 2 * i + 1):  # both samples of a greedy prompt are the HF continuation
            n = int(out.lengths[r])
            assert out.tokens[r, :n].tolist() == ref[:n].tolist(), f"prompt {i} row {r}"
            assert n == len(ref) or ref[n - 1] == 2


def test_samples_share_prefill(hf_pair):
    _, model = hf_pair(seed=7)
    prompts = _prompts(2)
    batch_sizes = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    shared = generate(model, prompts, num_samples=3, max_new_tokens=5, temperature=1.0, seed=11)
    hook.remove()
    assert batch_sizes == [3, 9, 9, 9, 9], batch_sizes  # one prefill of the 3 prompts, then 9 rows
    # Same draws as prefilling each prompt 3 times (row index and step key the random numbers).
    repeated = generate(
        model, [p for p in prompts for _ in range(3)], max_new_tokens=5, temperature=1.0, seed=11
    )
    assert torch.equal(shared.tokens, repeated.tokens)
    torch.testing.assert_close(shared.logprobs, repeated.logprobs, rtol=0, atol=1e-5)


def test_prompts_that_extend_one_another_are_prefilled_once(hf_pair, monkeypatch):
    """An episode's states (each prompt extends the last) and a duplicate: only the longest prompt of
    each chain is prefilled (2 trunk rows for 6 prompts, one of them out of order); the draws and
    log-probs equal those of prefilling every prompt on its own (float64)."""
    import sys

    from singleturn.model.generate import _trunks

    gen = sys.modules["singleturn.model.generate"]  # the package exports a function of the same name

    _, model = hf_pair(seed=12)
    model = model.double()
    a, b = _prompts(4, lens=[14, 9])
    prompts = [a[:5], b[:4], a[:9], a, b, a[:5]]  # chain a: 5, 9, 14 (and 5 again); chain b: 4, 9
    assert _trunks(prompts) == ([0, 1, 0, 0, 1, 0], [3, 4])
    assert _trunks([[1, 2], [1, 3], [1]]) == ([0, 1, 0], [0, 1])  # [1] goes with the first trunk
    sizes = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[:2])))
    kw = dict(num_samples=3, max_new_tokens=5, temperature=1.0, seed=11)
    shared = generate(model, prompts, **kw)
    hook.remove()
    assert sizes[0] == (2, 14), sizes  # the prefill: the two trunks only
    # The reference: every prompt its own trunk (each prefilled on its own), same rows, same draws.
    monkeypatch.setattr(gen, "_trunks", lambda ps: (list(range(len(ps))), list(range(len(ps)))))
    sizes.clear()
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[:2])))
    alone = generate(model, prompts, **kw)
    hook.remove()
    assert sizes[0] == (6, 14)
    assert torch.equal(shared.tokens, alone.tokens) and torch.equal(shared.lengths, alone.lengths)
    torch.testing.assert_close(shared.logprobs, alone.logprobs, rtol=0, atol=1e-12)
    assert len({tuple(r) for r in shared.tokens.tolist()}) > 6  # real draws, not one repeated row


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 20, 1.0), (1.0, 0, 0.9)]
)
def test_seeded_sampling_and_logprobs(hf_pair, temperature, top_k, top_p):
    _, model = hf_pair(seed=8)
    prompts = _prompts(3)
    kw = dict(num_samples=4, max_new_tokens=7, temperature=temperature, top_k=top_k, top_p=top_p)
    a = generate(model, prompts, seed=1, **kw)
    b = generate(model, prompts, seed=1, **kw)
    c = generate(model, prompts, seed=2, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    assert len({tuple(r) for r in a.tokens.tolist()}) > 3  # rows of one prompt differ
    # Teacher-forced recomputation of each sampled token's log-prob under the same truncation.
    from singleturn.kernels.sampling import truncation_mask

    rows = [prompts[r // 4] + row.tolist() for r, row in enumerate(a.tokens)]
    width = max(len(x) for x in rows)
    seq = torch.tensor([x + [0] * (width - len(x)) for x in rows])  # right-padded: causal, no mask needed
    with torch.no_grad():
        logits_all = model(seq).float() / temperature  # (N, width, V)
    for r, row in enumerate(a.tokens):
        n = len(prompts[r // 4])
        logits = logits_all[r, n - 1 : n - 1 + len(row)]  # positions that predicted the sampled tokens
        keep = truncation_mask(torch.softmax(logits, -1), top_k, top_p)
        logp = torch.log_softmax(torch.where(keep, logits, float("-inf")), -1)
        ref = logp.gather(-1, row[:, None])[:, 0]
        err = (a.logprobs[r] - ref).abs().max().item()
        assert err <= 1e-5, f"row {r}: logprob error {err:.3e}"


def test_stop_ids_end_rows(hf_pair):
    _, model = hf_pair(seed=9)
    prompts = _prompts(4)
    free = generate(model, prompts, num_samples=2, max_new_tokens=10, temperature=1.0, seed=3)
    stop = int(free.tokens[0, 2])  # row 0 emits this at step 2 (or earlier)
    out = generate(
        model, prompts, num_samples=2, max_new_tokens=10, temperature=1.0, seed=3, stop_ids=(stop,), pad_id=-1
    )
    assert isinstance(out, Samples)
    for r in range(6):
        n = int(out.lengths[r])
        row = out.tokens[r]
        hits = (free.tokens[r] == stop).nonzero()
        expected_n = int(hits[0]) + 1 if len(hits) else 10
        assert n == expected_n, f"row {r}: length {n}, expected {expected_n}"
        assert torch.equal(row[:n], free.tokens[r, :n])  # same draws up to the stop
        assert torch.all(row[n:] == -1) and torch.all(out.logprobs[r, n:] == 0)
        assert torch.all(out.logprobs[r, :n] < 0)
    assert out.token_lists()[0][-1] == stop and len(out.token_lists()[0]) <= 3


def test_all_rows_stop_early(hf_pair):
    _, model = hf_pair(seed=10)
    prompts = _prompts(5, lens=[4, 6])
    first = generate(model, prompts, max_new_tokens=1, temperature=0.0).tokens[:, 0].tolist()
    out = generate(model, prompts, max_new_tokens=40, temperature=0.0, stop_ids=first)
    assert out.lengths.tolist() == [1, 1] and out.tokens.shape == (2, 40)
    assert torch.all(out.tokens[:, 1:] == 0)


def test_rejects_bad_arguments(hf_pair):
    _, model = hf_pair(seed=0)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1, 2], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="num_samples"):
        generate(model, [[1, 2]], num_samples=0, max_new_tokens=3)


def test_shared_positions_as_1d_input_pos(hf_pair):
    _, model = hf_pair(seed=11, n_kv_heads=1)
    seq = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(seq)
        model.setup_caches(2, 9)
        model(seq[:, :6])
        for t in range(6, 9):  # (T,) positions shared by all rows
            step = model(seq[:, t : t + 1], input_pos=torch.tensor([t]))[:, 0]
            err = (step - full[:, t]).abs().max().item()
            assert err <= 1e-5, f"position {t}: error {err:.3e}"
        model.clear_caches()


def _tree_hook(paths, num_samples):
    """allowed_tokens over per-prompt token paths (a tiny trie by scanning); records its calls."""
    calls = []

    def allowed(row, prefix):
        calls.append((row, list(prefix)))
        opts = paths[row // num_samples]
        return sorted({p[len(prefix)] for p in opts if len(p) > len(prefix) and p[: len(prefix)] == prefix})

    return allowed, calls


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_allowed_tokens_constrains_and_logprobs_are_masked(hf_pair, temperature):
    _, model = hf_pair(seed=12)
    prompts = _prompts(4)
    stop = 2
    paths = [  # per prompt: allowed continuations, each ending with the stop id
        [[10, 11, 12, stop], [10, 13, stop], [14, stop]],
        [[20, stop], [21, 22, 23, 24, stop]],
        [[30, 31, stop]],
    ]
    S = 3
    hook, calls = _tree_hook(paths, S)
    out = generate(
        model,
        prompts,
        num_samples=S,
        max_new_tokens=6,
        temperature=temperature,
        stop_ids=(stop,),
        seed=3,
        pad_id=-1,
        allowed_tokens=hook,
    )
    rows = out.token_lists()
    for r, toks in enumerate(rows):
        assert toks in paths[r // S], f"row {r} left its allowed paths: {toks}"
    assert all(prefix == rows[r][: len(prefix)] for r, prefix in calls)  # finished rows are not asked
    # Teacher-forced reference: log-softmax over the allowed ids only.
    width = max(len(prompts[r // S]) + len(t) for r, t in enumerate(rows))
    seq = torch.tensor([(prompts[r // S] + t + [0] * width)[:width] for r, t in enumerate(rows)])
    with torch.no_grad():
        logits_all = model(seq).float()
    for r, toks in enumerate(rows):
        n = len(prompts[r // S])
        for j, tok in enumerate(toks):
            ids = hook(r, toks[:j])
            logits = logits_all[r, n - 1 + j]
            if temperature == 0.0:
                assert tok == ids[int(logits[ids].argmax())], f"row {r} step {j}: not the best allowed id"
                assert out.logprobs[r, j] == 0
            else:
                ref = logits[tok] - torch.logsumexp(logits[ids], -1)
                assert abs(float(out.logprobs[r, j]) - float(ref)) <= 1e-5, f"row {r} step {j}"


def test_allowed_tokens_all_ids_is_unconstrained(hf_pair):
    _, model = hf_pair(seed=13)
    prompts = _prompts(5)
    kw = dict(num_samples=2, max_new_tokens=5, temperature=1.0, stop_ids=(2,), seed=4)
    free = generate(model, prompts, **kw)
    full = generate(model, prompts, allowed_tokens=lambda row, prefix: range(V), **kw)
    assert torch.equal(free.tokens, full.tokens)
    torch.testing.assert_close(free.logprobs, full.logprobs, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no id"):
        generate(model, prompts, allowed_tokens=lambda row, prefix: [], **kw)


def _reference_scores(model, prompts, conts):
    """Teacher-forced: one full forward per (prompt + candidate), no cache, no sharing."""
    out = []
    with torch.no_grad():
        for p, cands in zip(prompts, conts):
            row = []
            for c in cands:
                logp = model(torch.tensor([p + c]))[0].double().log_softmax(-1)
                row.append(sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(c)))
            out.append(row)
    return out


@pytest.mark.parametrize("max_tokens", [8192, 8])  # one forward; one per prompt (a row may exceed it)
def test_score_continuations_equals_teacher_forced_forward(hf_pair, max_tokens):
    from singleturn.model.generate import score_continuations

    _, model = hf_pair(seed=8, n_kv_heads=1)
    prompts = _prompts(4)
    g = torch.Generator().manual_seed(9)
    conts = [  # 1, 4 and 2 candidates of lengths 1..5: ragged in both directions
        [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]
        for lens in ([3], [1, 5, 2, 4], [2, 2])
    ]
    got = score_continuations(model, prompts, conts, max_tokens=max_tokens)
    ref = _reference_scores(model, prompts, conts)
    assert [len(r) for r in got] == [1, 4, 2]
    for b, (g_row, r_row) in enumerate(zip(got, ref)):
        for j, (x, y) in enumerate(zip(g_row, r_row)):
            assert abs(x - y) <= 1e-4 * max(1.0, abs(y)), f"prompt {b} candidate {j}: {x} vs {y}"
    assert all(layer.attention.kv_cache is None for layer in model.layers)


def test_score_continuations_rejects_bad_input(hf_pair):
    from singleturn.model.generate import score_continuations

    _, model = hf_pair(seed=8)
    with pytest.raises(ValueError, match="continuation lists"):
        score_continuations(model, [[1, 2]], [])
    with pytest.raises(ValueError, match="non-empty"):
        score_continuations(model, [[1, 2]], [[[3], []]])


# --- score_continuations over a token trie: brute force, edge cases, grouping, computed tokens ---

TRIE_FIXTURE = [[1, 2, 3, 4], [1, 2, 3, 5], [6]]  # 'go to a 1', 'go to a 2', 'look': 6 nodes, not 9 tokens


def _tiny_llama(seed=0):
    """model.PRESETS['tiny'] shrunk (fp32, random, untied) with weights ~ N(0, 0.1): peaked logits."""
    import dataclasses

    from singleturn.model import PRESETS, Transformer

    cfg = dataclasses.replace(
        PRESETS["tiny"],
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=160,
        vocab_size=V,
        tie_word_embeddings=False,
    )
    model = Transformer(cfg)
    model.init_weights(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(5.0)  # 0.02 -> 0.1
    return model.eval()


def _brute_force_scores(model, prompts, conts):
    """A plain causal forward of prompt + candidate alone; fp32 log-softmax, summed in fp64."""
    out = []
    with torch.no_grad():
        for p, cands in zip(prompts, conts):
            row = []
            for c in cands:
                logp = model(torch.tensor([p + c]))[0].float().log_softmax(-1)  # (P + n, V)
                row.append(sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(c)))
            out.append(row)
    return out


def _edge_case_inputs():
    """Four prompts (37, 3, 13, 21 tokens): duplicates, prefixes of others, single tokens, one candidate."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (37, 3, 13, 21)]
    go, to = 17, 29
    alfworld = [[go, to, r, k, 2] for r in (101, 102, 103) for k in (7, 8)] + [[555, 2], [556, 2], [go, 2]]
    conts = [
        [[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7], [5, 6, 7, 8], [10], [5], [11, 12], [5, 6, 7, 9, 13]],
        [[40, 41, 42]],  # a prompt with one candidate
        [[4], [7], [4], [9]],  # single tokens, one duplicated
        alfworld,
    ]
    return prompts, conts


def _count_forwards(monkeypatch, model):
    """Record the (B, T) of every `model.hidden` call."""
    shapes, hidden = [], model.hidden

    def counted(tokens, **kw):
        shapes.append(tuple(tokens.shape))
        return hidden(tokens, **kw)

    monkeypatch.setattr(model, "hidden", counted)
    return shapes


@pytest.mark.parametrize("max_tokens", [8192, 1, 100])  # one forward; one per prompt; grouped by B x T
def test_score_continuations_trie_equals_brute_force(monkeypatch, max_tokens):
    from singleturn.model.generate import _token_trie, score_continuations

    model = _tiny_llama(seed=3)
    prompts, conts = _edge_case_inputs()
    shapes = _count_forwards(monkeypatch, model)
    got = score_continuations(model, prompts, conts, max_tokens=max_tokens)
    forwards = list(shapes)  # before the brute force adds its own
    ref = _brute_force_scores(model, prompts, conts)
    assert [len(r) for r in got] == [len(c) for c in conts]
    for b, (g_row, r_row) in enumerate(zip(got, ref)):
        for j, (x, y) in enumerate(zip(g_row, r_row)):
            assert abs(x - y) <= 1e-5, f"prompt {b} candidate {j}: {x} vs {y} (diff {abs(x - y):.2e})"
    # Duplicates score identically (one path); the scores are not all alike (the model is not flat).
    assert got[0][0] == got[0][3] and got[0][1] != got[0][0] and got[2][0] == got[2][2]
    # The forwards: row b is [prompt | trie nodes], rows packed in order while B x T <= max_tokens.
    widths = [len(p) + len(_token_trie(c).tokens) for p, c in zip(prompts, conts)]  # flat: 61, 6, 17, 57
    assert widths == [46, 6, 16, 43]
    expected = {8192: [(4, 46)], 1: [(1, 46), (1, 6), (1, 16), (1, 43)], 100: [(2, 46), (2, 43)]}
    assert forwards == expected[max_tokens]


def test_token_trie_shares_prefixes():
    from singleturn.model.generate import _token_trie

    t = _token_trie(TRIE_FIXTURE)
    assert t.tokens == [1, 2, 3, 4, 5, 6] and sum(map(len, TRIE_FIXTURE)) == 9
    assert t.parent == [-1, 0, 1, 2, 2, -1] and t.depth == [0, 1, 2, 3, 3, 0]
    assert t.paths == [[0, 1, 2, 3], [0, 1, 2, 4], [5]]
    t = _token_trie([[1, 2], [1], [1, 2], [3, 1, 2]])  # a prefix, a duplicate, a shared suffix (not merged)
    assert t.tokens == [1, 2, 3, 1, 2] and t.parent == [-1, 0, -1, 2, 3]
    assert t.paths == [[0, 1], [0], [0, 1], [2, 3, 4]]


def test_trie_rows_mask_positions_and_head_slots():
    """Node i sees the prompt, its ancestors and itself; pads only themselves; one head row per predictor."""
    from singleturn.model.generate import _token_trie, _trie_rows

    prompts = [[50, 51, 52], [60, 61, 62, 63, 64]]  # row 1 is padded to T = 9
    tries = [_token_trie(TRIE_FIXTURE), _token_trie([[9]])]
    r = _trie_rows(prompts, tries)
    T = 9
    assert r.tokens.tolist() == [
        [50, 51, 52, 1, 2, 3, 4, 5, 6],
        [60, 61, 62, 63, 64, 9, 0, 0, 0],
    ]
    assert r.positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 6, 3], [0, 1, 2, 3, 4, 5, 0, 0, 0]]
    want = torch.zeros(2, T, T, dtype=torch.bool)
    for b, (p, t) in enumerate(zip(prompts, tries)):
        P = len(p)
        for q in range(T):
            want[b, q, q] = True
            if q < P:
                want[b, q, :q] = True
            elif q < P + len(t.tokens):
                want[b, q, :P] = True
                node = q - P
                while node >= 0:
                    want[b, q, P + node] = True
                    node = t.parent[node]
    bad = (r.mask != want).nonzero().tolist()
    assert not bad, f"mask differs at (b, q, kv) {bad[:5]}"
    assert r.mask.any(-1).all()  # no all-masked row (pads see themselves)
    # Head rows: row 0's prompt end (-> 1 and 6), nodes 1, 2, 3 (3 -> 4 and 5); row 1's prompt end.
    assert list(zip(r.rows.tolist(), r.cols.tolist())) == [(0, 2), (0, 3), (0, 4), (0, 5), (1, 4)]
    assert r.slot.tolist() == [0, 1, 2, 3, 3, 0, 4] and r.targets.tolist() == [1, 2, 3, 4, 5, 6, 9]


def _cache_spy(model, monkeypatch):
    """Records (rows, seq_len) of every KV cache `generate` allocates."""
    sizes = []
    real = model.setup_caches

    def spy(rows, seq_len, **kw):
        sizes.append((rows, seq_len))
        return real(rows, seq_len, **kw)

    monkeypatch.setattr(model, "setup_caches", spy)
    return sizes


def test_plan_chunks_bounds_each_cache(hf_pair):
    _, model = hf_pair(seed=5)
    lens, S, new = [5, 9, 3, 7, 4], 2, 6
    prompts = _prompts(8, lens)
    per_slot = kv_cache_bytes(model, 1, 1)
    assert per_slot == 2 * model.config.n_layers * model.config.n_kv_heads * model.config.head_dim * 4  # fp32
    assert plan_chunks(model, prompts, S, new, kv_cache_bytes(model, 10, 15)) == [(0, 5)]  # all fits
    assert plan_chunks(model, prompts, S, new, 0) == [(0, 5)]  # no bound
    # Room for 4 rows of 15 slots: greedy in order, [5, 9] -> 4 rows x 15; [3, 7] -> 4 x 13; [4].
    assert plan_chunks(model, prompts, S, new, 4 * 15 * per_slot) == [(0, 2), (2, 4), (4, 5)]
    # One slot less: every prompt alone (the 9-id prompt's 2 rows need 2 x 15 = 30 slots).
    assert plan_chunks(model, prompts, S, new, 30 * per_slot) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    with pytest.raises(ValueError, match="prompt 1 .9 ids. x 2 samples.*raise the bound"):
        plan_chunks(model, prompts, S, new, 30 * per_slot - 1)


def test_chunked_generate_is_each_chunk_on_its_own_stream(hf_pair, monkeypatch):
    _, model = hf_pair(seed=6)
    lens, S = [5, 9, 3, 7, 4], 2
    prompts = _prompts(9, lens)
    kw = dict(num_samples=S, max_new_tokens=6, temperature=1.0, seed=21)
    bound = 4 * 15 * kv_cache_bytes(model, 1, 1)
    whole = generate(model, prompts, **kw)
    sizes = _cache_spy(model, monkeypatch)
    out = generate(model, prompts, max_cache_bytes=bound, **kw)
    assert sizes == [(4, 15), (4, 13), (2, 10)], sizes  # the plan's three chunks, each within the bound
    assert all(kv_cache_bytes(model, r, n) <= bound for r, n in sizes)
    assert out.tokens.shape == whole.tokens.shape
    monkeypatch.undo()
    parts = [
        generate(model, prompts[a:b], stream=c, **kw) for c, (a, b) in enumerate([(0, 2), (2, 4), (4, 5)])
    ]
    for f in ("tokens", "lengths"):
        assert torch.equal(getattr(out, f), torch.cat([getattr(p, f) for p in parts])), f
    torch.testing.assert_close(out.logprobs, torch.cat([p.logprobs for p in parts]), rtol=0, atol=1e-5)
    # Chunk 0 draws what the unchunked call draws for its rows; the other chunks draw on their own streams.
    assert torch.equal(out.tokens[: 2 * S], whole.tokens[: 2 * S])
    assert not torch.equal(out.tokens[2 * S :], whole.tokens[2 * S :])
    other = generate(model, prompts, stream=1, **kw)
    assert not torch.equal(other.tokens, whole.tokens)


def test_chunked_generate_keeps_allowed_tokens_rows(hf_pair):
    """allowed_tokens sees each row by its index in the whole call, whatever chunk decodes it."""
    _, model = hf_pair(seed=13)
    prompts, stop, S = _prompts(4), 2, 2
    paths = [[[10, 11, stop], [12, stop]], [[20, 21, 22, stop]], [[30, stop], [31, 32, stop]]]
    hook, calls = _tree_hook(paths, S)
    bound = kv_cache_bytes(model, S, max(PROMPT_LENS) + 6)  # one prompt per chunk
    out = generate(
        model, prompts, num_samples=S, max_new_tokens=6, temperature=1.0, stop_ids=(stop,), seed=4,
        pad_id=-1, allowed_tokens=hook, max_cache_bytes=bound,
    )  # fmt: skip
    rows = out.token_lists()
    assert len(rows) == len(prompts) * S
    for r, toks in enumerate(rows):
        assert toks in paths[r // S], f"row {r} left its allowed paths: {toks}"
    assert {r for r, _ in calls} == set(range(len(rows)))


def test_generate_rejects_bad_cache_bound_or_stream(hf_pair):
    _, model = hf_pair(seed=0)
    with pytest.raises(ValueError, match="max_cache_bytes"):
        generate(model, [[1, 2]], max_new_tokens=3, max_cache_bytes=-1)
    with pytest.raises(ValueError, match="stream"):
        generate(model, [[1, 2]], max_new_tokens=3, stream=1 << 32)
