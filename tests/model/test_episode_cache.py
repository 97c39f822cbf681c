"""EpisodeCache (model/episode_cache.py) against the cache-free paths, exactly.

Several episodes of different lengths advance in lockstep over several turns; at each turn every row's
candidates are scored as a trie on top of the cache (then dropped) and compared with
`score_continuations` over the whole committed sequence (fp32: 1e-5); greedy decoding through the cache
gives the same tokens as `generate` on the whole sequence, and trie-constrained greedy the same
command as `generate` under the admissible trie; truncating a row forgets its tail exactly.
"""

import random

import pytest
import torch

from singleturn.model.episode_cache import EpisodeCache
from singleturn.model.generate import generate, score_continuations

V = 1003


def _cands(rng, n):
    # shared prefixes (a trie with inner nodes), duplicates, a candidate that prefixes another
    base = [rng.randrange(3, V) for _ in range(3)]
    out = [base[:1] + [rng.randrange(3, V) for _ in range(rng.randint(0, 3))] for _ in range(n)]
    return out + [base[:1], list(out[0])]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("n_kv_heads", [1, 4])
def test_incremental_scores_equal_the_cache_free_path_over_turns(hf_pair, n_kv_heads, packed):
    _, model = hf_pair(seed=3, n_kv_heads=n_kv_heads)
    rng = random.Random(0)
    rows = 3
    seqs = [[rng.randrange(3, V) for _ in range(n)] for n in (5, 11, 2)]  # prompts of different lengths
    cache = EpisodeCache(model, rows, max_len=160, packed=packed)
    cache.append(seqs)
    for turn in range(4):
        cands = [_cands(rng, rng.randint(2, 6)) for _ in range(rows)]
        if turn == 2:
            cands[1] = []  # a row not scored this turn
        got = cache.score(cands)
        live = [r for r in range(rows) if cands[r]]
        ref = score_continuations(model, [seqs[r] for r in live], [cands[r] for r in live])
        for r, want in zip(live, ref):
            assert len(got[r]) == len(want)
            for g, w in zip(got[r], want):
                assert abs(g - w) <= 1e-5 * max(1.0, abs(w)), (turn, r, g, w)
        assert got[1] == [] if turn == 2 else True
        # commit: the chosen candidate + a new observation of a different length per row (row 2 idles at turn 1)
        new = []
        for r in range(rows):
            if turn == 1 and r == 2:
                new.append([])
                continue
            chosen = cands[r][0] if cands[r] else [7]
            new.append(chosen + [rng.randrange(3, V) for _ in range(rng.randint(1, 9))])
        cache.append(new)
        for r in range(rows):
            seqs[r] += new[r]
        # other forwards of the same model in between (cache-free, and generate's own caches) leave it intact
        generate(model, [[3, 4, 5]], num_samples=2, max_new_tokens=3, temperature=0.0, stop_ids=())
        assert cache.lengths == [len(s) for s in seqs]
    cache.close()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_long_append_beside_short_ones_is_split_and_exact(hf_pair, packed):
    """A new episode's first message among short turns: padded, the block covers the short turns and
    the long row's rest goes in a forward of its own (chunked prefill); packed, one forward holds every
    row's tokens. Every score and next-token logit equals the cache-free path; rows that idle or come
    later in the block are untouched."""
    _, model = hf_pair(seed=5, n_kv_heads=2)
    rng = random.Random(1)
    rows = 4
    seqs = [[rng.randrange(3, V) for _ in range(n)] for n in (6, 9, 4, 7)]
    cache = EpisodeCache(model, rows, max_len=200, packed=packed)
    cache.append(seqs)
    for turn in range(3):
        # row (turn % rows) starts a long stretch (a new episode's first message); row 3 idles at turn 1
        new = [[rng.randrange(3, V) for _ in range(rng.randint(1, 4))] for _ in range(rows)]
        new[turn % rows] = [rng.randrange(3, V) for _ in range(40)]
        if turn == 1:
            new[3] = []
        before = cache.forwards
        cache.append(new)
        if packed:  # every row's tokens in one forward, none padded
            assert cache.forwards == before + 1
        else:  # the short rows in the block, the long row's rest alone
            assert cache.forwards == before + 2, "the long row should go in a forward of its own"
        for r in range(rows):
            seqs[r] += new[r]
        assert cache.lengths == [len(s) for s in seqs]
        cands = [_cands(rng, 4) for _ in range(rows)]
        got = cache.score(cands)
        ref = score_continuations(model, seqs, cands)
        for r in range(rows):
            for g, w in zip(got[r], ref[r]):
                assert abs(g - w) <= 1e-5 * max(1.0, abs(w)), (turn, r, g, w)
        want = model(torch.as_tensor([seqs[0]]))[0, -1].float()
        assert torch.allclose(cache.next_logits([0])[0], want, atol=1e-4, rtol=1e-5)
    cache.close()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_greedy_through_the_cache_equals_generate(hf_pair, packed):
    _, model = hf_pair(seed=4, n_kv_heads=2)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    ref = generate(model, prompts, num_samples=1, max_new_tokens=8, temperature=0.0, stop_ids=())
    cache = EpisodeCache(model, 3, max_len=64, packed=packed)
    cache.append(prompts)
    cache.score([[[20, 21], [22]], [[23]], [[24, 25, 26]]])  # a suffix scored and dropped first
    out = [[] for _ in prompts]
    for _ in range(8):
        nxt = cache.next_logits().argmax(-1).tolist()
        for r, t in enumerate(nxt):
            out[r].append(t)
        cache.append([[t] for t in nxt])
    assert out == ref.tokens.tolist()
    cache.close()


def _branchings(cands, path):
    """Trie nodes on `path` (the root first) with more than one child: greedy's forwards for it."""
    return sum(
        len({tuple(c[: k + 1]) for c in cands if c[:k] == path[:k] and len(c) > k}) > 1
        for k in range(len(path))
    )


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_trie_greedy_equals_constrained_generate_and_truncation_forgets(hf_pair, packed):
    """cache.greedy picks, for every row, the candidate `generate` decodes greedily under the same trie
    on the whole sequence (prefix included), in one forward per branching point; truncating the row
    back and appending something else scores as if the decoded ids had never been there."""
    from singleturn.model.constrained import ActionTrie, allowed_tokens_fn

    _, model = hf_pair(seed=5, n_kv_heads=2)
    model = model.double()
    rng = random.Random(1)
    seqs = [[rng.randrange(3, V) for _ in range(n)] for n in (6, 3, 9)]
    prefix = [[40, 41], [], [42]]
    cache = EpisodeCache(model, 3, max_len=128, dtype=torch.float64, packed=packed)
    cache.append(seqs)
    for turn in range(3):
        cands = [
            [c + [2] for c in _cands(rng, rng.randint(2, 6))] for _ in range(3)
        ]  # every one ends in eot 2
        cands[1] = cands[1] if turn != 1 else []  # a row not decoded this turn
        before = cache.forwards
        picks, appended = cache.greedy(cands, prefix=prefix)
        live = [r for r in range(3) if cands[r]]
        tries = [ActionTrie(cands[r]) for r in live]
        ref = generate(
            model,
            [seqs[r] + prefix[r] for r in live],
            num_samples=1,
            max_new_tokens=8,
            temperature=0.0,
            stop_ids=(2,),
            allowed_tokens=allowed_tokens_fn(tries),
        ).token_lists()
        for r, want in zip(live, ref):
            assert cands[r][picks[r]] == want, (turn, r)
            assert appended[r] == (prefix[r] + want)[: len(appended[r])] and len(appended[r]) <= len(
                prefix[r]
            ) + len(want)
        assert picks[1] is None if turn == 1 else True

        assert cache.forwards - before == max(_branchings(cands[r], cands[r][picks[r]]) for r in live)
        for r in live:  # forget the decoded ids, commit something else
            cache.truncate(r, len(seqs[r]))
        with pytest.raises(ValueError, match="truncated"):
            cache.score([[[5]] if r in live else [] for r in range(3)])
        new = [[rng.randrange(3, V) for _ in range(rng.randint(1, 5))] for _ in range(3)]
        cache.append(new)
        for r in range(3):
            seqs[r] += new[r]
        cands = [[[7, 8], [9]] for _ in range(3)]
        got, want = cache.score(cands), score_continuations(model, seqs, cands)
        assert all(abs(g - w) <= 1e-9 for gr, wr in zip(got, want) for g, w in zip(gr, wr))
    with pytest.raises(ValueError, match="cannot keep"):
        cache.truncate(0, cache.lengths[0] + 1)
    cache.close()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sampling_through_the_cache_equals_generate_over_turns(hf_pair, packed):
    """cache.sample draws, for the rows listed (in any order, a subset), the ids and log-probs
    `generate` samples for the same batch of whole sequences (prefix included) with the same seed,
    top-k/top-p truncation included; the ids it appends are the ones it sampled but the last, and the
    next turn continues from them."""
    _, model = hf_pair(seed=6, n_kv_heads=2)
    model = model.double()
    rng = random.Random(2)
    seqs = [[rng.randrange(3, V) for _ in range(n)] for n in (4, 9, 2)]
    cache = EpisodeCache(model, 3, max_len=160, dtype=torch.float64, packed=packed)
    cache.append(seqs)
    stop = tuple(range(3, 150))  # ~15% of the vocabulary: rows stop at different steps
    lengths = []
    knobs = [dict(temperature=1.0), dict(temperature=0.7, top_k=50), dict(temperature=1.3, top_p=0.9)]
    for turn, (rows, kw) in enumerate(zip([[0, 1, 2], [2, 0], [1, 2, 0]], knobs)):
        prefix = [[30 + r, 31] for r in rows]
        seed = 11 + turn
        got = cache.sample(rows, prefix, max_new_tokens=6, stop_ids=stop, seed=seed, **kw)
        ref = generate(
            model,
            [seqs[r] + p for r, p in zip(rows, prefix)],
            num_samples=1,
            max_new_tokens=6,
            stop_ids=stop,
            seed=seed,
            **kw,
        )
        ref_logp = ref.logprobs.float()
        for i, (r, want) in enumerate(zip(rows, ref.token_lists())):
            ids, logp = got[i]
            assert ids == want, (turn, r)
            torch.testing.assert_close(logp, ref_logp[i, : len(want)], rtol=1e-5, atol=1e-6)
            seqs[r] += prefix[i] + ids[:-1]  # what the row holds now
            assert cache.lengths[r] == len(seqs[r]), (turn, r)
        lengths += [len(ids) for ids, _ in got]
    assert min(lengths) < 6 and max(lengths) > 1 and len(set(lengths)) > 1, lengths
    # the rows continue from what they hold: scores equal the cache-free path over the whole sequences
    cands = [[[7, 8], [9]] for _ in range(3)]
    got, want = cache.score(cands), score_continuations(model, seqs, cands)
    assert all(abs(g - w) <= 1e-9 for gr, wr in zip(got, want) for g, w in zip(gr, wr))
    with pytest.raises(ValueError, match="distinct"):
        cache.sample([0, 0], max_new_tokens=2, stop_ids=stop)
    cache.close()


def test_reset_starts_a_row_over(hf_pair):
    _, model = hf_pair(seed=5, n_kv_heads=1)
    cache = EpisodeCache(model, 2, max_len=64)
    cache.append([[5, 6, 7, 8], [9, 10]])
    cache.append([[11, 12], [13]])
    cache.reset([0])
    cache.append([[30, 31, 32], []])  # a new episode in row 0; row 1 goes on
    cands = [[[40], [41, 42]], [[43, 44]]]
    got = cache.score(cands)
    ref = score_continuations(model, [[30, 31, 32], [9, 10, 13]], cands)
    for g_row, r_row in zip(got, ref):
        assert max(abs(g - r) for g, r in zip(g_row, r_row)) <= 1e-5


def test_overflow_is_an_error_not_a_truncation(hf_pair):
    _, model = hf_pair(seed=6, n_kv_heads=1)
    cache = EpisodeCache(model, 2, max_len=8)
    cache.append([[1, 2, 3, 4, 5, 6, 7], [1]])
    with pytest.raises(ValueError, match="exceed the cache's max_len 8"):
        cache.score([[[5, 6]], []])  # 7 tokens + 2 trie nodes
    with pytest.raises(ValueError, match="exceed the cache's max_len 8"):
        cache.append([[1, 2], []])
    assert cache.lengths == [7, 1]  # nothing committed by a refused call
    cache.append([[8], [2]])  # row 0 fills exactly; its pads never clobber its last token
    got = cache.score([[], [[4], [4, 5]]])
    ref = score_continuations(model, [[1, 2]], [[[4], [4, 5]]])
    assert max(abs(g - r) for g, r in zip(got[1], ref[0])) <= 1e-5
    with pytest.raises(ValueError, match="holds no tokens"):
        EpisodeCache(model, 1, max_len=8).score([[[1]]])


def test_counts_only_the_tokens_it_computes(hf_pair):
    _, model = hf_pair(seed=7, n_kv_heads=1)
    cache = EpisodeCache(model, 2, max_len=64)
    cache.append([[1, 2, 3], [4]])
    cache.score([[[5, 6], [5, 7]], [[8]]])  # trie nodes 5, 6, 7 and 8: only 5 predicts (6 and 7)
    cache.append([[5, 6, 9], []])
    assert cache.computed_tokens == 4 + 1 + 3
    torch.testing.assert_close(
        cache.next_logits()[0], model(torch.tensor([[1, 2, 3, 5, 6, 9]]))[0, -1].float(), rtol=1e-5, atol=1e-5
    )


def test_a_per_turn_suffix_is_seen_not_counted_and_dropped(hf_pair):
    # The admissible list of this turn (say) sits between the history and the candidates: every candidate
    # is scored after it, its own log-prob is not in the totals, and the next append forgets it.
    _, model = hf_pair(seed=8, n_kv_heads=2)
    hist = [[5, 6, 7, 8], [9, 10, 11]]
    suffix = [[50, 51, 52], [53]]
    cands = [[[60, 61], [60, 62], [63]], [[64], [64, 65, 66]]]
    cache = EpisodeCache(model, 2, max_len=64)
    cache.append(hist)
    got = cache.score(cands, suffix=suffix)
    full = score_continuations(model, [h + s for h, s in zip(hist, suffix)], cands)
    for g_row, f_row in zip(got, full):
        assert max(abs(g - f) for g, f in zip(g_row, f_row)) <= 1e-5
    cache.append([[60, 61, 70], [64, 71]])  # the chosen actions and the next observations; no suffix kept
    got = cache.score([[[80]], [[81, 82]]])
    ref = score_continuations(model, [hist[0] + [60, 61, 70], hist[1] + [64, 71]], [[[80]], [[81, 82]]])
    for g_row, r_row in zip(got, ref):
        assert max(abs(g - r) for g, r in zip(g_row, r_row)) <= 1e-5
