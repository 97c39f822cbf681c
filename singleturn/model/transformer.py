"""A minimal LLaMA-3 decoder: RMSNorm, RoPE (llama3 scaling), GQA attention, SwiGLU, optional tied head.

Plain single-device code in the gpt-fast / torchtitan style: no torch.distributed, no device calls,
no KV cache in `__init__`; parallelism (trainer/fsdp.py) and the static KV cache (`setup_caches`)
are attached from outside. Numerics follow HF `LlamaForCausalLM` op for op (rotate_half RoPE, fp32
RMSNorm) so real checkpoints give the same logits. Attention: flash-attn for fp16/bf16 CUDA without
a cache, SDPA otherwise; packed rows come in through `hidden(tokens, positions=, attn_mask=)` with a
dense mask or a `SegmentMask` (FlexAttention on CUDA). Details: docs/pieces.md (model/).

References: Meta llama-models `model.py`; gpt-fast `model.py`; HF `modeling_llama.py`;
LLaMA-3.1 RoPE scaling (`_compute_llama3_parameters`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from singleturn.model.config import LlamaConfig, RopeScaling
from singleturn.model.segment_mask import SegmentMask

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch version
    BlockMask = flex_attention = None

try:  # optional GPU dependency (the [gpu] extra)
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_func = None

__all__ = [
    "Transformer",
    "TransformerBlock",
    "Attention",
    "FeedForward",
    "RMSNorm",
    "KVCache",
    "PackedRows",
    "rope_inv_freq",
]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None, device=None) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim // 2] fp32, with the LLaMA-3.1 wavelength-dependent scaling."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    )
    if scaling is None:
        return inv_freq
    # Long wavelengths (> old_ctx / low_freq_factor) are divided by `factor`, short ones
    # (< old_ctx / high_freq_factor) kept, the band in between interpolated smoothly.
    old_ctx = scaling.original_max_position_embeddings
    low_freq_wavelen = old_ctx / scaling.low_freq_factor
    high_freq_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rope_cos_sin(
    pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # pos (T,) or (B, T) int -> cos, sin (..., T, hd) in `dtype`; the angle is computed in fp32 like HF.
    freqs = pos.float()[..., None] * inv_freq.float()  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd) rotate_half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


@functools.cache
def _compiled_flex_attention():
    # Eager flex_attention is an unfused reference that materializes the scores; compiled, it is the
    # block-sparse kernel (recompiles per new shape, then marks the lengths dynamic).
    return torch.compile(flex_attention)


def _flex_attention(q, k, v, block_mask, enable_gqa: bool) -> torch.Tensor:
    # q (B, H, T, hd), k/v (B, n_kv, T, hd) -> (B, H, T, hd); CUDA compiled, elsewhere the eager reference.
    fn = _compiled_flex_attention() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, T, H, hd); cos/sin (T, hd) or (B, T, hd) -> broadcast over heads.
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)); the statistics in (at least) fp32, the result cast back to x.dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At least fp32 (bf16 -> fp32, fp32 unchanged); fp64 stays fp64 so an fp64 model is a true ground truth.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer cache k, v: [max_batch, n_kv, max_seq_len, hd], written at per-row positions."""

    def __init__(self, max_batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, *, dtype, device):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, n_kv, T, hd) at positions 0..T-1 of rows 0..B-1."""
        B, _, T, _ = k.shape
        self.k[:B, :, :T] = k
        self.v[:B, :, :T] = v

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_kv, T, hd) at per-row positions input_pos (B, T); return rows 0..B-1 in full."""
        B, n_kv, T, hd = k.shape
        idx = input_pos[:, None, :, None].expand(B, n_kv, T, hd)
        self.k[:B].scatter_(2, idx, k)
        self.v[:B].scatter_(2, idx, v)
        return self.k[:B], self.v[:B]

    def update_row(self, b: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Store k, v (1, n_kv, T, hd) at slots (T,) of row b; return row b's first kv_len slots (1, n_kv, kv_len, hd)."""
        self.k[b].index_copy_(1, slots, k[0])
        self.v[b].index_copy_(1, slots, v[0])
        return self.k[b : b + 1, :, :kv_len], self.v[b : b + 1, :, :kv_len]

    def rows(self, lo: int, hi: int) -> KVCache:
        """A cache over rows lo..hi-1 of this one, sharing its storage (writes go through): a forward
        of a few rows of a larger cache computes only those rows."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[lo:hi], persistent=False)
        view.register_buffer("v", self.v[lo:hi], persistent=False)
        return view

    def gather_rows(self, src: torch.Tensor) -> None:
        """Row n <- row src[n] for n < len(src), in place (src on the cache's device). One layer's
        rows are copied once (index_select), not the whole cache."""
        n = src.shape[0]
        for cache in (self.k, self.v):
            cache[:n] = cache.index_select(0, src)


@dataclass
class PackedRows:
    """Tokens of several KV-cache rows in one forward of batch 1, without padding (model/episode_cache.py).

    Cache row b's tokens are tokens[0, bounds[b]:bounds[b + 1]] (none: the row sits out), written at
    their slots (`input_pos`); they attend the row's first kv_len[b] slots under masks[b], a (T_b,
    kv_len[b]) bool over the slots, or, where masks[b] is None, every slot up to their own. The
    matmuls run once over every row's tokens (their speed per token needs many tokens on CPU); the
    attention runs per row, over that row's own length only. Each row's mask is built once per
    forward and shared by the layers."""

    bounds: list[int]
    kv_len: list[int]
    masks: list[torch.Tensor | None]
    _additive: dict = field(default_factory=dict, repr=False)

    def additive(self, b: int, input_pos: torch.Tensor, rep: int, dtype: torch.dtype) -> torch.Tensor:
        """Row b's mask as SDPA takes it for `rep` query heads per kv head: (1, 1, rep*T_b, kv_len) of
        0 / -inf in `dtype` (what SDPA makes of a bool mask; made here once, not once per layer)."""
        key = (b, rep, dtype)
        if key not in self._additive:
            s, e = self.bounds[b], self.bounds[b + 1]
            mask = self.masks[b]
            if mask is None:  # a query in slot p sees slots 0..p of its row
                slots = torch.arange(self.kv_len[b], device=input_pos.device)
                mask = slots[None, :] <= input_pos[0, s:e, None]
            add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self._additive[key] = add.repeat(rep, 1)[None, None]  # query rows: head-major, as q's
        return self._additive[key]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None,
        attn_mask: torch.Tensor | None = None,
        kv_len: int | None = None,
    ):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv, hd)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)

        if input_pos is None:
            # Positions 0..T-1: plain causal attention over this chunk; a cache (if any) only records it.
            if self.kv_cache is not None:
                self.kv_cache.write_prefix(k.transpose(1, 2), v.transpose(1, 2))
            flash = flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            if flash and attn_mask is None:
                y = flash_attn_func(q, k, v, causal=True)  # (B, T, H, hd), GQA handled by the kernel
                return self.wo(y.reshape(B, T, -1))
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
            if BlockMask is not None and isinstance(attn_mask, BlockMask):
                y = _flex_attention(q, k, v, attn_mask, self.n_kv_heads != self.n_heads)  # (B, H, T, hd)
                return self.wo(y.transpose(1, 2).reshape(B, T, -1))
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if attn_mask is None else attn_mask[:, None],  # (B, 1, T, T) bool
                is_causal=attn_mask is None,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, H, T, hd)
        else:
            if self.kv_cache is None:
                raise RuntimeError("input_pos needs a KV cache: call model.setup_caches(...) first")
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
            if isinstance(attn_mask, PackedRows):
                return self.wo(
                    self._attend_rows(q, k, v, input_pos, attn_mask).transpose(1, 2).reshape(B, T, -1)
                )
            k_all, v_all = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hd)
            if kv_len is not None:  # attend the first kv_len slots only (every query's own slot is below)
                k_all, v_all = k_all[:, :, :kv_len], v_all[:, :, :kv_len]
            if attn_mask is None:
                # A query in slot p sees cache slots 0..p of its own row (slots past p hold stale data).
                slots = torch.arange(k_all.shape[2], device=x.device)
                mask = slots[None, None, None, :] <= input_pos[:, None, :, None]  # (B, 1, T, S)
            else:  # (B, T, S) bool over cache slots: e.g. a candidate trie scored on top of a cache
                mask = attn_mask[:, None, :, : k_all.shape[2]]
            # GQA without copying the cache: the rep = H / n_kv query heads that share a kv head
            # (heads h*rep .. h*rep+rep-1, HF's grouping) become rep*T query rows of that kv head.
            rep = self.n_heads // self.n_kv_heads
            q = q.reshape(B, self.n_kv_heads, rep * T, self.head_dim)  # (B, n_kv, rep*T, hd)
            mask = mask[:, :, None].expand(B, 1, rep, T, mask.shape[-1]).reshape(B, 1, rep * T, -1)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, n_kv, rep*T, hd)
            y = y.view(B, self.n_heads, T, self.head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _attend_rows(self, q, k, v, input_pos: torch.Tensor, rows: PackedRows) -> torch.Tensor:
        """PackedRows attention: q (1, H, N, hd), k/v (1, n_kv, N, hd) -> (1, H, N, hd), row by row."""
        rep, hd = self.n_heads // self.n_kv_heads, self.head_dim
        out = torch.empty_like(q)
        for b, kv_len in enumerate(rows.kv_len):
            s, e = rows.bounds[b], rows.bounds[b + 1]
            if s == e:
                continue
            k_all, v_all = self.kv_cache.update_row(b, input_pos[0, s:e], k[:, :, s:e], v[:, :, s:e], kv_len)
            qb = q[:, :, s:e].reshape(1, self.n_kv_heads, rep * (e - s), hd)  # GQA as in the padded path
            mask = rows.additive(b, input_pos, rep, q.dtype)
            y = F.scaled_dot_product_attention(qb, k_all, v_all, attn_mask=mask)  # (1, n_kv, rep*T_b, hd)
            out[:, :, s:e] = y.view(1, self.n_heads, e - s, hd)
        return out


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = HF gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)

    def forward(self, x, cos, sin, input_pos=None, attn_mask=None, kv_len=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, attn_mask, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """LLaMA-3 decoder. `model(tokens[B,T]) -> logits[B,T,V]` in the parameter dtype.

    Meta-device construction: build under `torch.device("meta")`, then `to_empty(device=...)`,
    `init_buffers(device)` and either `init_weights(seed)` or a checkpoint load (model/hf_io.py).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tie_weights(self) -> None:
        """With tie_word_embeddings, make `output.weight` the same Parameter as `tok_embeddings.weight`.

        Call again after anything that replaces parameters (to_empty, load_state_dict(assign=True)).
        """
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent RoPE buffer on `device` (after meta construction / to_empty)."""
        device = torch.device(device) if device is not None else self.tok_embeddings.weight.device
        c = self.config
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, device=device)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Linear and embedding weights ~ N(0, 0.02), norm weights = 1; reproducible across devices.

        Values are drawn on the CPU from a generator seeded with `seed`, then copied, so the same seed
        gives the same weights on any device (meant for small models and tests).
        """
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():  # a tied weight is listed (and drawn) once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen))

    def setup_caches(self, max_batch: int, max_seq_len: int, *, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache per layer, [max_batch, n_kv, max_seq_len, hd] (gpt-fast style)."""
        c, w = self.config, self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch, max_seq_len, c.n_kv_heads, c.head_dim, dtype=dtype or w.dtype, device=w.device
            )

    def clear_caches(self) -> None:
        """Free the KV caches (the model is back to training shape)."""
        for layer in self.layers:
            layer.attention.kv_cache = None

    def gather_cache_rows(self, src: torch.Tensor) -> None:
        """Cache row n <- row src[n] in every layer (prompts prefilled as part of a longer one)."""
        for layer in self.layers:
            layer.attention.kv_cache.gather_rows(src)

    def hidden(
        self,
        tokens: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | SegmentMask | BlockMask | PackedRows | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) int64 -> h (B, T, D) after the final norm, in the parameter dtype.

        input_pos None: positions 0..T-1 (training, prefill). input_pos (B, T) or (T,) int64: absolute
        per-row positions, reading and writing the KV cache (decoding). With a cache, `positions` (B, T)
        (RoPE) and `attn_mask` (B, T, cache_len) bool (which cache slots each token sees) together
        decouple a token's slot from its position: a trie of candidates written into slots past a
        row's length, each node attending the row's committed slots and its own ancestors
        (model/episode_cache.py). kv_len (cache only): attend the first kv_len slots, not the whole
        cache (above every slot this call writes; the caller knows where its rows end).
        With a cache, `attn_mask` may instead be a `PackedRows`: tokens (1, N) of several cache rows
        packed without padding, each row attending only its own length (positions optional).
        Tree / packed attention (cache-free only): `attn_mask` replaces the causal mask and `positions`
        (B, T) int64 gives each token's RoPE position; e.g. GRPO groups [prompt | r_1 | ... | r_G] or
        packed SFT examples (model.masks builders), or a prompt followed by candidate continuations
        (model.generate.score_continuations). The mask is a (B, T, T) bool tensor (True where query i
        may attend key j; SDPA), a `model.masks.SegmentMask` (resolved once here by `for_attention`:
        FlexAttention on CUDA, dense elsewhere), or a FlexAttention BlockMask.
        """
        if isinstance(attn_mask, SegmentMask):
            attn_mask = attn_mask.for_attention(tokens.device)  # once per forward, shared by every layer
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T, D)
        if input_pos is None:
            pos = torch.arange(T, device=tokens.device) if positions is None else positions
        else:
            input_pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos
            if isinstance(attn_mask, PackedRows):
                if B != 1 or attn_mask.bounds[-1] != T:
                    raise ValueError(f"PackedRows: tokens must be (1, {attn_mask.bounds[-1]}), got {(B, T)}")
            elif (positions is None) != (attn_mask is None) or not (
                attn_mask is None or torch.is_tensor(attn_mask)
            ):
                raise ValueError(
                    "with input_pos (cache slots), positions (RoPE) and attn_mask (B, T, cache_len) bool "
                    "go together: a tree of tokens scored on top of a KV cache"
                )
            pos = input_pos if positions is None else positions
        cos, sin = _rope_cos_sin(pos, self.inv_freq, h.dtype)  # (T, hd) or (B, T, hd)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, attn_mask, kv_len)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, V) in the parameter dtype (see `hidden` for input_pos)."""
        return self.output(self.hidden(tokens, input_pos=input_pos))
