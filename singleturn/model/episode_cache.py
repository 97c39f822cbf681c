"""Live episodes as growing token sequences: each turn computes only the tokens it adds.

`EpisodeCache(model, rows, max_len, trie_slots=0, packed=None)` holds one static KV cache row per
live episode (the model's `setup_caches`): a row holds at most `max_len` tokens (positions), and a
scored trie may use `trie_slots` slots past that (its nodes sit at positions len + depth, but each
needs its own slot). Every operation takes all the episodes in lockstep in one forward: `packed`
(the default on CPU) puts every row's tokens in one sequence without padding (`PackedRows`: the
matmuls over all of them at once, the attention row by row over each row's own length); otherwise
the rows are padded to the longest and each attends up to the longest row's length (one kernel
launch per op for every episode: the default on GPUs). The operations an agent loop needs:

- `append(new_tokens)`: row r's committed sequence grows by new_tokens[r] (the next observation, the
  action taken, ...; an empty list leaves the row as it is). Only the new tokens are computed; they
  attend to the row's cache. The hidden state of each row's last token is kept: it predicts what
  comes next.
- `score(candidates)`: the total log-prob of each candidate continuation of each row (ranked
  decoding over the admissible commands), computed as a token trie on top of the cache and then
  dropped: only the trie's inner nodes are computed (a leaf predicts nothing); a node is written
  into a cache slot past the row's length, sits at RoPE position
  len + depth and attends the row's committed slots, its ancestors and itself (the same function as
  `generate.score_continuations` over the whole sequence, which recomputes the prefix every time).
  The trie's slots are overwritten by the next `append`; a query never sees a slot past its own.
- `greedy(candidates)`: trie-constrained greedy decoding of one candidate per row, one batched
  forward per branching point of the trie (a token the trie forces goes in with the next choice); the
  tokens it decodes stay appended, up to the last one it had to compute.
- `sample(rows, ...)`: free sampled decoding (a rollout's response), one batched forward per token
  over the listed rows, drawn with `kernels.sample_tokens` at counter (step, row's place in the
  call) exactly as `generate` draws for the same batch of whole prompts; the sampled ids stay appended.
- `next_logits(rows)`: the logits of each row's next token.
- `truncate(row, length)`: forget a row's tokens past `length` (a decoded action that the episode's
  next turn writes differently, a per-turn suffix); the next `append` to it overwrites them.

Everything is exact with respect to the cache-free path (tests/model/test_episode_cache.py: fp32
scores to 1e-5, greedy tokens identical, over several turns, with suffixes added and dropped, rows of
different lengths). What a prompt holds and how an episode is written as a sequence are the caller's
choice; the ids appended are the ids used (a chosen action's tokens are appended as they were scored
or generated, never re-tokenized).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from singleturn.kernels.sampling import sample_tokens
from singleturn.model.generate import _token_trie
from singleturn.model.transformer import PackedRows, Transformer

__all__ = ["EpisodeCache"]


class EpisodeCache:
    """One KV-cache row per episode; see the module docstring. Needs full (unsharded) weights."""

    def __init__(
        self,
        model: Transformer,
        rows: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        trie_slots: int = 0,
        packed: bool | None = None,
    ):
        if rows < 1 or max_len < 2 or trie_slots < 0:
            raise ValueError(
                f"EpisodeCache needs rows >= 1, max_len >= 2, trie_slots >= 0; got {rows}, {max_len}, {trie_slots}"
            )
        self.model, self.rows, self.max_len = model, rows, max_len
        self.slots = max_len + trie_slots  # a row's slots; slot `slots` is the scratch slot for pads
        self.device = model.tok_embeddings.weight.device
        self.packed = self.device.type == "cpu" if packed is None else packed  # module docstring
        # The caches are this object's, installed on the model only for the length of its own forwards:
        # any other forward of the model in between (a cache-free one writes the caches it finds,
        # `generate` replaces them) can neither corrupt them nor be slowed by them.
        model.setup_caches(rows, self.slots + 1, dtype=dtype)  # + a scratch slot for pads (see append)
        self._caches = [layer.attention.kv_cache for layer in model.layers]
        model.clear_caches()
        self.lengths = [0] * rows
        self._last_h = torch.zeros(
            rows, model.config.dim, dtype=dtype or model.tok_embeddings.weight.dtype, device=self.device
        )
        self.computed_tokens = 0  # tokens through the model so far (appended + scored trie nodes)
        self.forwards = 0  # batched forwards so far
        self._stale: set[int] = set()  # truncated rows: _last_h is not their last token's until an append

    def close(self) -> None:
        """Free the caches."""
        self._caches = []

    @contextlib.contextmanager
    def _installed(self, lo: int, hi: int):
        """The caches on the model for one forward of rows lo..hi-1 (views of this object's caches)."""
        if not self._caches:
            raise RuntimeError("EpisodeCache is closed")
        layers = self.model.layers
        before = [layer.attention.kv_cache for layer in layers]
        for layer, cache in zip(layers, self._caches):
            layer.attention.kv_cache = cache.rows(lo, hi)
        try:
            yield
        finally:
            for layer, cache in zip(layers, before):
                layer.attention.kv_cache = cache

    def reset(self, rows: Sequence[int]) -> None:
        """Start rows over (a new episode in a finished one's row); their old slots become invisible."""
        for r in rows:
            self.lengths[r] = 0
            self._stale.discard(r)

    def truncate(self, row: int, length: int) -> None:
        """Keep row's first `length` tokens (0 < length <= its length); append to it before scoring."""
        if not 0 < length <= self.lengths[row]:
            raise ValueError(f"truncate: row {row} holds {self.lengths[row]} tokens, cannot keep {length}")
        if length < self.lengths[row]:
            self.lengths[row] = length
            self._stale.add(row)

    def _check_fresh(self, rows, what: str) -> None:
        stale = sorted(self._stale.intersection(rows))
        if stale:
            raise ValueError(f"{what}: rows {stale} were truncated and not appended to since")

    def _check_room(self, r: int, extra: int, what: str, limit: int | None = None) -> None:
        limit = self.max_len if limit is None else limit
        if self.lengths[r] + extra > limit:
            name = "max_len" if limit == self.max_len else "max_len + trie_slots"
            raise ValueError(
                f"episode row {r}: {self.lengths[r]} tokens + {extra} {what} exceed the cache's {name} "
                f"{limit} (window the episode or raise it; nothing is truncated silently)"
            )

    @torch.no_grad()
    def append(self, new_tokens: Sequence[Sequence[int]]) -> None:
        """Commit new_tokens[r] to row r (len(new_tokens) == rows; empty lists skip a row).

        Packed: one forward of every row's tokens. Padded: one forward over the rows' first `T` new
        tokens, then one batch-1 forward per row for the rest of its tokens (chunked prefill: exact);
        `T` minimizes the padded tokens computed: a new episode's first message (~150 tokens) among
        turns of ~40 would otherwise pad every row to its length (measured: 2.5x the tokens of a real
        evaluation's appends)."""
        if len(new_tokens) != self.rows:
            raise ValueError(f"append: {len(new_tokens)} token lists for {self.rows} rows")
        if max(len(t) for t in new_tokens) == 0:
            return
        for r, t in enumerate(new_tokens):
            self._check_room(r, len(t), "new tokens")
        live = [r for r, t in enumerate(new_tokens) if t]
        if self.packed:
            h = self._forward_packed({r: (list(new_tokens[r]), None, None) for r in live})
            for r in live:
                self._last_h[r] = h[r][-1]
                self.lengths[r] += len(new_tokens[r])
            self.computed_tokens += sum(len(new_tokens[r]) for r in live)
        else:
            T = _batched_length([len(t) for t in new_tokens], B=max(live) + 1)
            self._forward_block([list(t[:T]) for t in new_tokens])
            # the rest of each row, alone (after the block: its pads past a row's end are dead)
            for r in live:
                if len(new_tokens[r]) > T:
                    self._forward_row(r, list(new_tokens[r][T:]))
        self._stale.difference_update(live)

    def _forward_packed(self, items: dict) -> dict[int, torch.Tensor]:
        """One forward of the rows in items, packed (model.PackedRows): items[r] = (tokens, positions
        or None for their slots, mask (n, len + n) bool over the row's slots or None for causal) ->
        {r: (n, D) hidden states}. The tokens go into the slots after the row's length; nothing is
        committed (the caller moves lengths)."""
        lo, hi = min(items), max(items) + 1
        bounds, kv_len, masks = [0], [], []
        tokens: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        for r in range(lo, hi):
            t, pos, mask = items.get(r, ([], None, None))
            L, n = self.lengths[r], len(t)
            tokens += t
            slots += range(L, L + n)
            positions += range(L, L + n) if pos is None else pos
            bounds.append(bounds[-1] + n)
            kv_len.append(L + n)
            masks.append(None if mask is None else mask.to(self.device))
        rows = PackedRows(bounds, kv_len, masks)
        with self._installed(lo, hi):
            h = self.model.hidden(
                torch.as_tensor([tokens], dtype=torch.int64, device=self.device),
                input_pos=torch.as_tensor([slots], dtype=torch.int64, device=self.device),
                positions=torch.as_tensor([positions], dtype=torch.int64, device=self.device),
                attn_mask=rows,
            )[0]
        self.forwards += 1
        return {r: h[bounds[r - lo] : bounds[r - lo + 1]] for r in items}

    def _forward_block(self, new_tokens: list[list[int]]) -> None:
        """One forward of rows lo..hi-1 (the first and the last row with tokens), each row's tokens
        padded to the longest; rows without tokens and the pads of shorter rows write into slots past
        their row's length, which no later query sees before an append overwrites them; past the
        row's slots they go to the scratch slot `slots`, which holds no token of any row (a query at
        slot p < slots never sees it)."""
        live = [r for r, t in enumerate(new_tokens) if t]
        lo, hi, T = min(live), max(live) + 1, max(len(t) for t in new_tokens)
        tokens = torch.zeros((hi - lo, T), dtype=torch.int64)
        slots = torch.empty((hi - lo, T), dtype=torch.int64)
        for r in range(lo, hi):
            t = new_tokens[r]
            tokens[r - lo, : len(t)] = torch.as_tensor(t, dtype=torch.int64) if t else tokens[r - lo, :0]
            slots[r - lo] = (self.lengths[r] + torch.arange(T)).clamp(max=self.slots)
        tokens, slots = tokens.to(self.device), slots.to(self.device)
        with self._installed(lo, hi):  # attend only up to the highest slot written (not the whole max_len)
            h = self.model.hidden(tokens, input_pos=slots, kv_len=int(slots.max()) + 1)  # (B, T, D)
        self.forwards += 1
        for r in live:
            n = len(new_tokens[r])
            self._last_h[r] = h[r - lo, n - 1]
            self.lengths[r] += n
        self.computed_tokens += sum(len(new_tokens[r]) for r in live)

    def _forward_row(self, r: int, new: list[int]) -> None:
        """One forward of row r alone (batch 1, on a view of its cache row): its tokens continue it."""
        n, L = len(new), self.lengths[r]
        tokens = torch.as_tensor([new], dtype=torch.int64, device=self.device)
        slots = (L + torch.arange(n)).view(1, n).to(self.device)
        with self._installed(r, r + 1):
            h = self.model.hidden(tokens, input_pos=slots, kv_len=L + n)  # (1, n, D)
        self.forwards += 1
        self._last_h[r] = h[0, n - 1]
        self.lengths[r] += n
        self.computed_tokens += n

    @torch.no_grad()
    def next_logits(self, rows: Sequence[int] | None = None) -> torch.Tensor:
        """(len(rows), V) fp32 logits of each listed row's next token (default: every row; a row that
        holds no token yet gives garbage). Only the listed rows go through the LM head."""
        rows = range(self.rows) if rows is None else list(rows)
        self._check_fresh(rows, "next_logits")
        idx = torch.as_tensor(list(rows), dtype=torch.int64, device=self.device)
        return self.model.output(self._last_h[idx]).float()

    @torch.no_grad()
    def score(
        self, candidates: Sequence[Sequence[Sequence[int]]], suffix: Sequence[Sequence[int]] | None = None
    ) -> list[list[float]]:
        """Total log-prob (fp32 log-softmax, fp64 sum) of each candidate after each row's sequence.

        candidates[r]: row r's candidates (non-empty token lists; [] for a row not scored). suffix[r]
        (optional): per-turn tokens between the sequence and the candidates (e.g. this turn's admissible
        list and the assistant header), computed once as the trie's trunk, seen by every candidate and
        not counted in its total. Nothing is committed: append what the episode keeps afterwards."""
        if len(candidates) != self.rows:
            raise ValueError(f"score: {len(candidates)} candidate lists for {self.rows} rows")
        for r, cands in enumerate(candidates):
            if any(len(c) == 0 for c in cands):
                raise ValueError(f"score: row {r} has an empty candidate")
        if suffix is not None:
            if len(suffix) != self.rows:
                raise ValueError(f"score: {len(suffix)} suffixes for {self.rows} rows")
            skip = [len(suffix[r]) if candidates[r] else 0 for r in range(self.rows)]
            candidates = [[list(suffix[r]) + list(c) for c in cands] for r, cands in enumerate(candidates)]
        else:
            skip = [0] * self.rows
        scored = [r for r, c in enumerate(candidates) if c]
        if not scored:
            return [[] for _ in candidates]
        for r in scored:
            if self.lengths[r] == 0:
                raise ValueError(f"score: row {r} holds no tokens yet (append its prompt first)")
        self._check_fresh(scored, "score")
        tries = {r: _token_trie(candidates[r]) for r in scored}
        # Only the inner nodes go through the model: a node's hidden state predicts its children, and a
        # leaf (the last token of a candidate) predicts nothing (a quarter of a real trie's nodes).
        inner = {r: sorted({p for p in tries[r].parent if p >= 0}) for r in scored}
        for r in scored:  # the nodes' slots, and their positions (the deepest: the longest candidate)
            self._check_room(r, len(inner[r]), "trie nodes", limit=self.slots)
            self._check_room(r, max(tries[r].depth) + 1, "tokens of the longest candidate")
        nodes = {r: self._trie_nodes(r, tries[r], inner[r]) for r in scored if inner[r]}
        h = {r: self._last_h[r : r + 1][:0] for r in scored}  # no inner node: the last token predicts all
        if nodes:
            h.update(self._forward_packed(nodes) if self.packed else self._trie_forward(nodes))
        out: list[list[float]] = [[] for _ in candidates]
        for r in scored:
            t = tries[r]
            pred = torch.cat([self._last_h[r : r + 1], h[r]])  # predictors: the last token, inner nodes
            logp = self.model.output(pred).float().log_softmax(-1)  # (1 + inner, V)
            row_of = {p: k + 1 for k, p in enumerate(inner[r])}
            idx = torch.as_tensor([0 if p < 0 else row_of[p] for p in t.parent], device=self.device)
            node_logp = logp[idx, torch.as_tensor(t.tokens, device=self.device)].double().cpu().tolist()
            out[r] = [float(sum(node_logp[v] for v in path[skip[r] :])) for path in t.paths]
        self.computed_tokens += sum(len(inner[r]) for r in scored)
        return out

    def _trie_nodes(self, r: int, t, ids: list[int]) -> tuple[list[int], list[int], torch.Tensor]:
        """Row r's computed trie nodes (ids: inner node ids, parents first) as (tokens, positions, mask):
        node k goes in slot len + k at position len + depth and sees the committed slots, its
        ancestors and itself (mask (n, len + n) bool over the row's slots)."""
        L, n, rank = self.lengths[r], len(ids), {i: k for k, i in enumerate(ids)}
        mask = torch.zeros((n, L + n), dtype=torch.bool)
        mask[:, :L] = True
        anc: list[list[int]] = []  # an inner node's ancestors are inner nodes, listed before it
        for k, i in enumerate(ids):
            par = t.parent[i]
            anc.append((anc[rank[par]] if par >= 0 else []) + [L + k])
            mask[k, anc[k]] = True
        return [t.tokens[i] for i in ids], [L + t.depth[i] for i in ids], mask

    def _trie_forward(self, nodes: dict) -> dict[int, torch.Tensor]:
        """One padded forward of rows lo..hi-1 (the first and last row in nodes, see _trie_nodes): rows
        without nodes and the pads of shorter rows see only their own slot (past the row's slots: the
        scratch slot) -> {r: (n, D) hidden states}."""
        lo, hi = min(nodes), max(nodes) + 1
        B, S = hi - lo, max(len(tok) for tok, _, _ in nodes.values())
        tokens = torch.zeros((B, S), dtype=torch.int64)
        positions = torch.zeros((B, S), dtype=torch.int64)
        slots = torch.stack(
            [(self.lengths[lo + b] + torch.arange(S)).clamp(max=self.slots) for b in range(B)]
        )
        kv_len = int(slots.max()) + 1  # the attention reads (and the mask spans) only the slots in use
        mask = torch.zeros((B, S, kv_len), dtype=torch.bool)
        for b in range(B):
            mask[b, torch.arange(S), slots[b]] = True  # every query sees itself: no all-masked row
            if lo + b in nodes:
                tok, pos, m = nodes[lo + b]
                tokens[b, : len(tok)] = torch.as_tensor(tok, dtype=torch.int64)
                positions[b, : len(tok)] = torch.as_tensor(pos, dtype=torch.int64)
                mask[b, : len(tok), : m.shape[1]] = m
        with self._installed(lo, hi):
            h = self.model.hidden(
                tokens.to(self.device),
                input_pos=slots.to(self.device),
                positions=positions.to(self.device),
                attn_mask=mask.to(self.device),
                kv_len=kv_len,
            )
        self.forwards += 1
        return {r: h[r - lo, : len(tok)] for r, (tok, _, _) in nodes.items()}

    @torch.no_grad()
    def greedy(
        self, candidates: Sequence[Sequence[Sequence[int]]], prefix: Sequence[Sequence[int]] | None = None
    ) -> tuple[list[int | None], list[list[int]]]:
        """(picks, appended): per row, the index of the candidate trie-constrained greedy decoding picks
        after prefix[r] (appended first, e.g. this turn's assistant header), and the ids appended to
        the row (prefix[r] + the decoded ids up to the last branching point: the ids the trie forces
        after it are not computed). Rows with no candidates: (None, []). A duplicate candidate loses to
        the first listed; equal logits go to the candidate listed first. The row is left holding the
        appended ids: truncate it to drop them."""
        if len(candidates) != self.rows or (prefix is not None and len(prefix) != self.rows):
            raise ValueError(f"greedy: candidates (and prefix) must have one entry per row ({self.rows})")
        rows = [r for r, c in enumerate(candidates) if c]
        tries, kids, leaf = {}, {}, {}
        for r in rows:
            if any(len(c) == 0 for c in candidates[r]):
                raise ValueError(f"greedy: row {r} has an empty candidate")
            t = tries[r] = _token_trie(candidates[r])
            k = kids[r] = {-1: []}
            for i, par in enumerate(t.parent):  # children in creation order: the first listed first
                k.setdefault(par, []).append(i)
                k.setdefault(i, [])
            leaf[r] = {}
            for c, path in enumerate(t.paths):
                leaf[r].setdefault(path[-1], c)
        node = dict.fromkeys(rows, -1)
        pending = {r: list(prefix[r]) if prefix is not None else [] for r in rows}  # picked, not yet appended
        appended: list[list[int]] = [[] for _ in range(self.rows)]
        picks: list[int | None] = [None] * self.rows
        active = rows
        while True:
            for r in active:  # follow the ids the trie forces
                while len(kids[r][node[r]]) == 1:
                    node[r] = kids[r][node[r]][0]
                    pending[r].append(tries[r].tokens[node[r]])
                if not kids[r][node[r]]:  # a leaf: a whole candidate
                    picks[r] = leaf[r][node[r]]
            active = [r for r in active if picks[r] is None]
            if not active:
                return picks, appended
            new = [pending[r] if r in active else [] for r in range(self.rows)]
            self.append(new)
            for r in active:
                appended[r] += pending[r]
            logits = self.next_logits(active)  # (len(active), V)
            for j, r in enumerate(active):
                options = kids[r][node[r]]
                ids = torch.as_tensor([tries[r].tokens[i] for i in options], device=logits.device)
                node[r] = options[int(torch.argmax(logits[j, ids]))]  # the first of equal maxima
                pending[r] = [tries[r].tokens[node[r]]]

    @torch.no_grad()
    def sample(
        self,
        rows: Sequence[int],
        prefix: Sequence[Sequence[int]] | None = None,
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> list[tuple[list[int], torch.Tensor]]:
        """[(ids, fp32 log-probs)] per listed row: prefix[i] (this turn's material, e.g. the assistant
        header) is appended to rows[i] first, then up to max_new_tokens ids are sampled, the stop id
        included. Row i of the call draws at counter (step, i) with `seed`, as `generate` draws for
        prompt i of a batch: the same ids as `generate` on the whole sequences (exact up to the
        logits' rounding). The sampled ids stay appended (the last one is appended only if the row
        continues: truncate to drop them)."""
        rows = list(rows)
        if len(set(rows)) != len(rows) or any(not 0 <= r < self.rows for r in rows):
            raise ValueError(f"sample: rows must be distinct rows of the cache, got {rows}")
        if max_new_tokens < 1:
            raise ValueError(f"sample: max_new_tokens must be >= 1, got {max_new_tokens}")
        if prefix is not None:
            if len(prefix) != len(rows):
                raise ValueError(f"sample: {len(prefix)} prefixes for {len(rows)} rows")
            new = [[] for _ in range(self.rows)]
            for r, p in zip(rows, prefix):
                new[r] = list(p)
            self.append(new)
        for r in rows:
            if self.lengths[r] == 0:
                raise ValueError(f"sample: row {r} holds no tokens yet (append its prompt first)")
        stop = set(stop_ids)
        ids: list[list[int]] = [[] for _ in rows]
        logps: list[list[float]] = [[] for _ in rows]
        live = list(range(len(rows)))  # places in the call still decoding
        for step in range(max_new_tokens):
            logits = self.next_logits(rows)  # every row draws (its counter is its place), as generate does
            tok, logp = sample_tokens(
                logits, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, offset=step
            )
            tok, logp = tok.tolist(), logp.tolist()
            for i in live:
                ids[i].append(tok[i])
                logps[i].append(logp[i])
            live = [i for i in live if tok[i] not in stop]
            if not live or step + 1 == max_new_tokens:
                break
            new = [[] for _ in range(self.rows)]
            for i in live:
                new[rows[i]] = [tok[i]]
            self.append(new)
        return [(t, torch.tensor(lp, dtype=torch.float32)) for t, lp in zip(ids, logps)]


# A batch-1 forward's fixed cost (one `hidden` call through every layer), in tokens of a batched forward:
# the split below pays it per row sent alone. An order-of-magnitude guess, not a measurement; it only
# decides between near-equal splits (a row ~100 tokens longer than the rest is split either way).
_ROW_FORWARD_TOKENS = 16


def _batched_length(lengths: list[int], B: int) -> int:
    """The batched forward's length T minimizing the tokens computed: B x T padded in the block, plus,
    for each row longer than T, its remaining tokens and one batch-1 forward's fixed cost."""

    def cost(T: int) -> int:
        return B * T + sum(n - T + _ROW_FORWARD_TOKENS for n in lengths if n > T)

    return min(sorted({n for n in lengths if n > 0}), key=lambda T: (cost(T), -T))
