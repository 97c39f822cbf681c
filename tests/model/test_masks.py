"""model/masks.py: layouts on hand-made fixtures, the packer's budgets, FlexAttention tiles, and exactness.

Exactness (CPU, seconds): per-token log-probs (kernels.token_logprobs on the gathered hidden states,
as the trainer computes them) of the shared-prefix layout against today's padded layout (one
right-padded row per sequence), and of packed SFT against padded SFT: in fp64 equal to 1e-12 (the
layouts compute the same function), in fp32 within twice the padded layout's own error against fp64
(see `_check_layout` for why not a fixed 1e-6); the gradients of a weighted sum of per-token losses
w.r.t. every parameter equal (max error <= 1e-5 x the tensor's largest gradient in fp32, 1e-10 in fp64).
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch

from singleturn.kernels.token_logprobs import token_logprobs
from singleturn.model.masks import (
    SegmentMask,
    build_packed_causal_batch,
    build_shared_prefix_batch,
    pack_by_tokens,
)
from singleturn.model.segment_mask import _block_tables, _pad_to_blocks

V = 1003


def _ids(n, rng):
    return [rng.randrange(3, V) for _ in range(n)]


def _random_groups(seed, prompt_lens, group_sizes, max_resp=9):
    rng = random.Random(seed)
    return [
        (_ids(P, rng), [_ids(rng.randint(1, max_resp), rng) for _ in range(G)])
        for P, G in zip(prompt_lens, group_sizes)
    ]


# ----------------------------------------------------------------------------- hand-made fixtures


def test_shared_prefix_fixture_one_row():
    groups = [([10, 11, 12], [[20, 21], [22]]), ([5, 6], [[7], [8, 9], [1]])]
    (mb,) = build_shared_prefix_batch(groups, max_tokens=100)
    assert mb.tokens.tolist() == [[10, 11, 12, 20, 21, 22, 5, 6, 7, 8, 9, 1]]
    assert mb.positions.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3, 2]]
    assert mb.mask.segment.tolist() == [[0] * 6 + [1] * 6]
    assert mb.mask.branch.tolist() == [[0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 2, 3]]
    # Response tokens in input order; a response's first token is predicted by its prompt's last slot.
    assert mb.targets.tolist() == [20, 21, 22, 7, 8, 9, 1]
    assert mb.rows.tolist() == [0] * 7
    assert mb.cols.tolist() == [2, 3, 2, 7, 7, 9, 7]
    assert mb.seq.tolist() == [0, 0, 1, 2, 3, 3, 4]
    want = [
        "100000000000",
        "110000000000",
        "111000000000",
        "111100000000",  # r1[0] sees the prompt and itself
        "111110000000",  # r1[1] sees the prompt, r1[0], itself
        "111001000000",  # r2[0] sees the prompt and itself, not r1
        "000000100000",  # the second group sees nothing of the first
        "000000110000",
        "000000111000",
        "000000110100",
        "000000110110",
        "000000110001",
    ]
    got = ["".join(str(int(x)) for x in row) for row in mb.mask.dense()[0].tolist()]
    assert got == want, "\n".join(got)
    assert mb.num_tokens == 7 and mb.computed_tokens == 12


def test_shared_prefix_fixture_two_rows_padded():
    groups = [([10, 11, 12], [[20, 21], [22]]), ([5, 6], [[7], [8, 9]])]  # 6 and 5 tokens
    (mb,) = build_shared_prefix_batch(groups, max_tokens=12, row_len=8, pad_id=99)
    assert mb.tokens.tolist() == [[10, 11, 12, 20, 21, 22], [5, 6, 7, 8, 9, 99]]
    assert mb.positions.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 2, 3, 0]]
    assert mb.mask.segment.tolist() == [[0] * 6, [0] * 5 + [-1]]
    assert mb.rows.tolist() == [0, 0, 0, 1, 1, 1] and mb.cols.tolist() == [2, 3, 2, 1, 1, 3]
    assert mb.targets.tolist() == [20, 21, 22, 7, 8, 9] and mb.seq.tolist() == [0, 0, 1, 2, 3, 3]
    dense = mb.mask.dense()
    assert dense[1, 5].tolist() == [False] * 5 + [True]  # padding sees itself only
    assert not dense[1, :5, 5].any()  # and nothing sees padding


def test_packed_causal_fixture():
    examples = [([1, 2], [3]), ([4], [5, 6]), ([7, 8, 9], [])]
    (mb,) = build_packed_causal_batch(examples, max_tokens=64)
    assert mb.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert mb.positions.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2]]
    assert mb.mask.segment.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]]
    assert mb.mask.branch.tolist() == [[0] * 9]
    assert mb.cols.tolist() == [1, 3, 4] and mb.targets.tolist() == [3, 5, 6] and mb.seq.tolist() == [0, 1, 1]
    i = torch.arange(9)
    seg = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    want = (i[:, None] >= i[None, :]) & (seg[:, None] == seg[None, :])  # block-diagonal causal
    assert torch.equal(mb.mask.dense()[0], want)


def test_builders_reject_bad_input():
    with pytest.raises(ValueError, match="group 1"):
        build_shared_prefix_batch([([1], [[2]]), ([], [[3]])], max_tokens=8)
    with pytest.raises(ValueError, match="group 0"):
        build_shared_prefix_batch([([1], [])], max_tokens=8)
    with pytest.raises(ValueError, match="example 0"):
        build_packed_causal_batch([([], [1])], max_tokens=8)
    with pytest.raises(ValueError, match="segment and branch"):
        SegmentMask(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))


# ----------------------------------------------------------------------------- the packer


def test_pack_by_tokens_fixture():
    lengths = [5, 3, 9, 2, 4]
    # One row per micro-batch (row_len = max_tokens); the 9-token item gets its own row, not dropped.
    assert pack_by_tokens(lengths, max_tokens=8) == [[[0, 1]], [[2]], [[3, 4]]]
    # Rows of at most 4 tokens, then rows x width <= 8 per micro-batch.
    assert pack_by_tokens(lengths, max_tokens=8, row_len=4) == [[[0]], [[1]], [[2]], [[3], [4]]]
    assert pack_by_tokens(lengths, max_tokens=10, items_per_row=1) == [[[0], [1]], [[2]], [[3], [4]]]
    # pad_to rounds each width up: rows [3], [2] would be 4 + 4 tokens; rounded to 8 they do not share.
    assert pack_by_tokens([3, 2], max_tokens=8, row_len=3) == [[[0], [1]]]
    assert pack_by_tokens([3, 2], max_tokens=8, row_len=3, pad_to=8) == [[[0]], [[1]]]
    # First fit decreasing: 9, then 5 (new row), 4 (joins the 5), 3 (new row), 2 (joins the 3).
    assert pack_by_tokens(lengths, max_tokens=10, order="length") == [[[2]], [[0, 4]], [[1, 3]]]
    assert pack_by_tokens(lengths, max_tokens=20, row_len=10, order="length") == [[[2], [0, 4]], [[1, 3]]]
    with pytest.raises(ValueError):
        pack_by_tokens(lengths, max_tokens=0)
    with pytest.raises(ValueError, match="order"):
        pack_by_tokens(lengths, max_tokens=8, order="random")


@pytest.mark.parametrize("order", ["input", "length"])
@pytest.mark.parametrize("seed", range(4))
def test_pack_by_tokens_budget_and_order(seed, order):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(37)]
    max_tokens, row_len, pad_to = 64, rng.choice([16, 40, 64]), rng.choice([1, 8])
    batches = pack_by_tokens(lengths, max_tokens=max_tokens, row_len=row_len, pad_to=pad_to, order=order)
    flat = [i for batch in batches for row in batch for i in row]
    if order == "input":
        assert flat == list(range(len(lengths))), "every item exactly once, in input order"
    else:
        assert sorted(flat) == list(range(len(lengths))), "every item exactly once"
    for batch in batches:
        widths = [sum(lengths[i] for i in row) for row in batch]
        for row, w in zip(batch, widths):
            assert w <= row_len or len(row) == 1, (row, w)
        T = -(-max(widths) // pad_to) * pad_to
        assert len(batch) * T <= max_tokens or len(batch) == 1, (batch, T)


def test_every_input_is_gathered_once():
    groups = _random_groups(0, [40, 7, 90, 3, 25], [3, 5, 1, 4, 2])
    batches = build_shared_prefix_batch(groups, max_tokens=96, row_len=48)
    assert len(batches) > 1
    seq = torch.cat([mb.seq for mb in batches]).tolist()
    targets = torch.cat([mb.targets for mb in batches]).tolist()
    responses = [r for _, rs in groups for r in rs]
    assert seq == [i for i, r in enumerate(responses) for _ in r]
    assert targets == [t for r in responses for t in r]
    # The gathered slot holds the token before the target (the prompt's last for a first token), at
    # RoPE position P - 1 + k for the response's token k.
    want_tok, want_pos = [], []
    for p, rs in groups:
        for r in rs:
            want_tok += [p[-1]] + r[:-1]
            want_pos += range(len(p) - 1, len(p) - 1 + len(r))
    got_tok = torch.cat([mb.tokens[mb.rows, mb.cols] for mb in batches]).tolist()
    got_pos = torch.cat([mb.positions[mb.rows, mb.cols] for mb in batches]).tolist()
    assert got_tok == want_tok and got_pos == want_pos


# ----------------------------------------------------------------------------- FlexAttention tiles


def _expand(tiles: torch.Tensor, bs: int, T: int) -> torch.Tensor:
    return tiles.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :T, :T]


def _layouts():
    groups = _random_groups(1, [150, 9, 60, 33], [3, 5, 1, 7], max_resp=12)
    yield "shared-one-row", build_shared_prefix_batch(groups, max_tokens=4096)[0].mask
    yield "shared-rows", build_shared_prefix_batch(groups, max_tokens=1024, row_len=200)[0].mask
    rng = random.Random(2)
    examples = [(_ids(rng.randint(1, 90), rng), _ids(rng.randint(0, 20), rng)) for _ in range(9)]
    yield "causal-one-row", build_packed_causal_batch(examples, max_tokens=4096)[0].mask
    yield "causal-rows", build_packed_causal_batch(examples, max_tokens=1024, row_len=150)[0].mask
    # Not a builder layout: segments interleaved (non-contiguous); the tiles must still cover it.
    seg = torch.tensor([[0, 1] * 20 + [-1] * 3])
    yield "interleaved", SegmentMask(seg, torch.zeros_like(seg))


@pytest.mark.parametrize("bs", [4, 16, 128])
@pytest.mark.parametrize("name,mask", list(_layouts()), ids=[n for n, _ in _layouts()])
def test_block_tables_cover_the_mask_exactly(name, mask, bs):
    B, T = mask.shape
    seg, br = _pad_to_blocks(mask.segment, mask.branch, bs)
    partial, full = _block_tables(seg, br, bs)
    dense = mask.dense()
    p, f = _expand(partial, bs, T), _expand(full, bs, T)
    assert not (partial & full).any(), "a tile is partial or full, not both"
    assert not (dense & ~(p | f)).any(), f"{name}: an allowed pair lies in a skipped tile"
    assert not (f & ~dense).any(), f"{name}: a tile marked full holds a masked pair"
    if name.startswith("shared-one-row") and bs == 16:  # the tiles are sparse, and full ones are found
        assert full.any() and not (partial | full).all()
    bm = mask.block_mask(bs)
    assert torch.equal(bm.kv_num_blocks[:, 0], partial.sum(-1, dtype=torch.int32))
    assert torch.equal(bm.full_kv_num_blocks[:, 0], full.sum(-1, dtype=torch.int32))
    for b in range(B):
        for q in range(partial.shape[1]):
            n = int(bm.kv_num_blocks[b, 0, q])
            assert sorted(bm.kv_indices[b, 0, q, :n].tolist()) == partial[b, q].nonzero().flatten().tolist()


# ----------------------------------------------------------------------------- exactness


def _logp(model, h_N, targets):
    # fp32 as the trainer computes it (the fused op); fp64 (not supported by the op) with a plain log-softmax.
    if h_N.dtype == torch.float64:
        return model.output(h_N).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    return token_logprobs(h_N, model.output.weight, targets)  # (N,) fp32


def _packed_logp(model, batches) -> torch.Tensor:
    """Per-token log-probs in input order (sequence by sequence), whatever the placement order."""
    out = []
    for mb in batches:
        h = model.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask)  # (B, T, D)
        out.append(_logp(model, h[mb.rows, mb.cols], mb.targets))
    seq = torch.cat([mb.seq for mb in batches])  # a sequence's tokens are contiguous, in order
    return torch.cat(out)[torch.argsort(seq, stable=True)]


def _padded_logp(model, pairs) -> torch.Tensor:
    """Today's trainer layout (trainer.data.pack_completions): one right-padded row per sequence."""
    T = max(len(p) + len(c) for p, c in pairs)
    tokens = torch.zeros((len(pairs), T), dtype=torch.int64)
    rows, cols, targets = [], [], []
    for b, (p, c) in enumerate(pairs):
        tokens[b, : len(p) + len(c)] = torch.tensor(list(p) + list(c))
        rows += [b] * len(c)
        cols += range(len(p) - 1, len(p) - 1 + len(c))
        targets += c
    h = model.hidden(tokens)  # (B, T, D), plain causal
    return _logp(model, h[torch.tensor(rows), torch.tensor(cols)], torch.tensor(targets))


def _per_sequence_logp(model, pairs) -> torch.Tensor:
    """One forward per (prompt + completion), no padding at all."""
    out = []
    for prompt, completion in pairs:
        if completion:
            h = model.hidden(torch.tensor([list(prompt) + list(completion)]))[0]  # (L, D)
            cols = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
            out.append(_logp(model, h[cols], torch.tensor(completion)))
    return torch.cat(out)


def _grads_of(model, logp, loss_w) -> dict[str, torch.Tensor]:
    (logp * loss_w).sum().backward()  # a weighted sum of per-token losses
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _check_grads(got, want, rel):
    for name, g_ref in want.items():
        scale = g_ref.abs().max().item()
        err = (got[name] - g_ref).abs().max().item()
        assert err <= rel * scale, f"{name}: grad error {err:.3e} vs grad max {scale:.3e} (rel {rel})"


def _check_layout(model, packed_fn, pairs, reference_fn, seed):
    """fp32: the packed layout's log-prob error against fp64 per-sequence forwards is at most twice the
    reference layout's own fp32 error (+ a 1e-6 floor), and its gradients equal the reference layout's
    (max error <= 1e-5 x the tensor's largest gradient). fp64: both equal to 1e-12 (1e-10 for grads).

    Why not a fixed 1e-6 on the fp32 log-probs: they lie in [-10, -4] for V = 1003, where one fp32 ulp
    is 4.8e-7 to 9.5e-7, and today's padded layout already differs from unpadded per-sequence
    forwards by up to 1.4e-6 (3 ulps): a fixed 1e-6 would fail on the reference layouts themselves.
    """
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        truth = _per_sequence_logp(model64, pairs)
    logp, ref = packed_fn(model), reference_fn(model)
    err, ref_err = (logp.double() - truth).abs().max().item(), (ref.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"fp32 log-prob error {err:.3e} vs the reference layout's {ref_err:.3e}"
    loss_w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))
    _check_grads(_grads_of(model, logp, loss_w), _grads_of(model, ref, loss_w), 1e-5)

    logp64, ref64 = packed_fn(model64), reference_fn(model64)
    err64 = (logp64 - ref64).abs().max().item()
    assert err64 <= 1e-12, f"fp64 log-prob error {err64:.3e}: the layouts compute different functions"
    w64 = loss_w.double()
    _check_grads(_grads_of(model64, logp64, w64), _grads_of(model64, ref64, w64), 1e-10)


@pytest.mark.parametrize(
    "case,budget",
    [
        (dict(n_kv_heads=2, tie=False), dict(max_tokens=4096)),  # every group in one row
        (dict(n_kv_heads=1, tie=True), dict(max_tokens=512, row_len=128)),  # several rows + padding
        (dict(n_kv_heads=4, tie=False, rope_scaling=False), dict(max_tokens=256, items_per_row=2)),
        (dict(n_kv_heads=2, tie=True), dict(max_tokens=256, row_len=128, order="length")),  # out of order
    ],
    ids=["one-row-gqa2", "rows-mqa-tied", "two-per-row-mha", "rows-ffd"],
)
def test_shared_prefix_equals_per_sequence_forward(hf_pair, case, budget):
    _, model = hf_pair(seed=3, **case)
    groups = _random_groups(4, [37, 5, 61, 13], [3, 5, 1, 4])  # ragged prompts, odd G, ragged responses
    batches = build_shared_prefix_batch(groups, **budget)
    assert sum(len(set(mb.seq.tolist())) for mb in batches) == 13
    pairs = [(p, r) for p, rs in groups for r in rs]
    _check_layout(model, lambda m: _packed_logp(m, batches), pairs, lambda m: _padded_logp(m, pairs), seed=5)


@pytest.mark.parametrize(
    "budget",
    [
        dict(max_tokens=4096),
        dict(max_tokens=300, row_len=100),
        dict(max_tokens=300, row_len=100, order="length"),
    ],
    ids=["one-row", "rows", "rows-ffd"],
)
def test_packed_sft_equals_padded_sft(hf_pair, budget):
    _, model = hf_pair(seed=6, n_kv_heads=2, tie=True)
    rng = random.Random(7)
    examples = [(_ids(rng.randint(1, 70), rng), _ids(rng.randint(1, 8), rng)) for _ in range(7)]
    batches = build_packed_causal_batch(examples, **budget)
    _check_layout(
        model, lambda m: _packed_logp(m, batches), examples, lambda m: _padded_logp(m, examples), seed=8
    )


@pytest.mark.parametrize("bs", [8, 128])
def test_flex_attention_reference_equals_dense(hf_pair, bs):
    """The BlockMask's mask_mod through FlexAttention's eager reference (CPU: forward only) vs SDPA."""
    _, model = hf_pair(seed=9, n_kv_heads=2)
    groups = _random_groups(10, [29, 50], [3, 4])
    (mb,) = build_shared_prefix_batch(groups, max_tokens=4096)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        dense = model.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask.dense())
        flex = model.hidden(mb.tokens, positions=mb.positions, attn_mask=mb.mask.block_mask(bs))
    err = (flex - dense).abs().max().item()
    assert err <= 1e-5, f"flex vs dense hidden error {err:.3e}"


def test_for_attention_is_dense_on_cpu():
    (mb,) = build_packed_causal_batch([([1, 2, 3], [4]), ([5], [6, 7])], max_tokens=64)
    got = mb.mask.for_attention("cpu")
    assert isinstance(got, torch.Tensor) and torch.equal(got, mb.mask.dense())


@pytest.mark.slow
def test_compiled_flex_attention_cpu_equals_dense():
    """The block tables through a real block-sparse kernel (inductor's CPU FlexAttention, forward only):
    skipped tiles and full tiles (where the rule is not applied) must not change the result. The CUDA
    kernel is checked in tests/model/test_gpu.py; this one needs a C++ compiler and ~1-2 min of compile."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)
    groups = _random_groups(11, [300, 90, 37, 140], [3, 5, 8, 1])
    rng = random.Random(12)
    examples = [(_ids(rng.randint(1, 200), rng), _ids(rng.randint(0, 20), rng)) for _ in range(9)]
    masks = [
        build_shared_prefix_batch(groups, max_tokens=4096, row_len=400)[0].mask,  # (2, T): rows + padding
        build_packed_causal_batch(examples, max_tokens=4096, row_len=700)[0].mask,  # another T: dynamic
    ]
    g = torch.Generator().manual_seed(13)
    for mask in masks:
        B, T = mask.shape
        q, k, v = (torch.randn(B, h, T, 16, generator=g) for h in (4, 2, 2))
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.dense()[:, None], enable_gqa=True
        )
        with torch.no_grad():
            out = flex(q, k, v, block_mask=mask.block_mask(), enable_gqa=True)
        err = (out - ref).abs().max().item()
        assert err <= 1e-5, f"compiled flex vs dense SDPA on {tuple(mask.shape)}: {err:.3e}"
