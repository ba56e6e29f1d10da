"""One request row of an attention call and how it reuses one stored entry: its states and mask, exact rows and
rescored columns of its map, the corrected normalisers, and the per-position distances that decide what changed."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .eager import additive_mask, attention_scores, grouped_matmul, masked_scores
from .entry import AttentionEntry
from .masks import all_true, any_along, any_true
from .positions import Pattern, Positions

_EXP_LIMIT = 80.0


@dataclass(eq=False)
class Row:
    """One request row of an attention call: its states (heads first), its mask pattern, the call's scaling."""

    query: torch.Tensor
    """(heads, L, d)"""
    key: torch.Tensor
    """(kv_heads, L, d)"""
    value: torch.Tensor
    """(kv_heads, L, d)"""
    keep: torch.Tensor
    """(L, L) bool, True where a query may attend"""
    pattern: Pattern
    scaling: float
    softcap: float | None
    tolerance: float
    """Largest relative change of a position's states for its row or column to be reused."""

    @property
    def length(self) -> int:
        return self.query.shape[-2]

    @functools.cached_property
    def query_limits(self) -> torch.Tensor:
        """Per position, the distance from a stored query beyond which the position's row counts as changed."""
        return self.tolerance * position_norms(self.query)

    @functools.cached_property
    def key_limits(self) -> torch.Tensor:
        """Per position, the distance from a stored key beyond which the position's column counts as changed."""
        return self.tolerance * position_norms(self.key)

    @functools.cached_property
    def value_limits(self) -> torch.Tensor:
        """Per position, the distance from a stored value beyond which the position's column counts as changed."""
        return self.tolerance * position_norms(self.value)

    def same_states(self, other: Row) -> bool:
        """Whether ``other`` has exactly this row's states and mask (an identical row of the same batch)."""
        return all(
            torch.equal(mine, theirs)
            for mine, theirs in zip(
                (self.query, self.key, self.value, self.keep),
                (other.query, other.key, other.value, other.keep),
                strict=True,
            )
        )

    @property
    def groups(self) -> int:
        return self.query.shape[0] // self.key.shape[0]

    def exact_outputs(self, rows: Positions) -> torch.Tensor:
        """Exact attention outputs of the query rows ``rows``: (heads, n, d), through sdpa where it computes the
        same thing (no soft-capping, no query without any key to attend to)."""
        query = rows.take(self.query, 1)
        keep = None if self.pattern.full else rows.take(self.keep, 0)
        if self.softcap is not None or (keep is not None and not all_true(any_along(keep, -1))):
            return grouped_matmul(self.exact_rows(rows), self.value)
        return _sdpa(query, self.key, self.value, keep, self.scaling)

    def exact_head_maps(self, heads: torch.Tensor) -> torch.Tensor:
        """Exact maps of the query heads ``heads``: (n, L, L)."""
        keep = None if self.pattern.full else self.keep[None, None]
        key = self.key.index_select(0, heads // self.groups)
        return attention_scores(self.query.index_select(0, heads)[None], key[None], keep, self.scaling, self.softcap)[0]

    def exact_head_outputs(self, heads: torch.Tensor) -> torch.Tensor:
        """Exact attention outputs of the query heads ``heads``, every row: (n, L, d)."""
        value = self.value.index_select(0, heads // self.groups)
        if self.softcap is not None or any_true(self.pattern.empty):
            return torch.matmul(self.exact_head_maps(heads), value)
        key = self.key.index_select(0, heads // self.groups)
        keep = None if self.pattern.full else self.keep
        return _sdpa(self.query.index_select(0, heads), key, value, keep, self.scaling)

    def exact_rows(self, rows: Positions) -> torch.Tensor:
        """Exact attention rows ``rows``: (heads, n, L)."""
        query = rows.take(self.query, 1)
        if self.softcap is not None or query.dtype != torch.float32:
            keep = None if self.pattern.full else rows.take(self.keep, 0)[None, None]
            return attention_scores(query[None], self.key[None], keep, self.scaling, self.softcap)[0]
        scores = _grouped_scores(query, self.key, self.scaling)
        if not self.pattern.full:
            scores.add_(additive_mask(rows.take(self.keep, 0), scores.dtype))
        return nn.functional.softmax(scores, dim=-1, dtype=torch.float32)

    def column_weights(self, columns: Positions, rows: Positions, lse: torch.Tensor) -> torch.Tensor:
        """``exp(S[r, c] - lse[r])`` of this row's states for the queries ``rows`` and the keys ``columns``, 0 where
        masked: (heads, rows, columns) float32."""
        keep = None if self.pattern.full else columns.take(rows.take(self.keep, 0), 1)
        query, key = rows.take(self.query, 1), columns.take(self.key, 1)
        return _shifted_weights(query, key, rows.take(lse, 1), keep, self.scaling, self.softcap)

    def stored_column_weights(self, entry: AttentionEntry, columns: Positions, rows: Positions) -> torch.Tensor:
        """The stored map's weights of the queries ``rows`` on the keys ``columns``, recomputed from the entry's
        states and normaliser: (heads, rows, columns) float32."""
        keep = columns.take(rows.take(entry.mask.to(self.keep.device), 0), 1)
        query, key = rows.take(self._stored(entry.query), 1), columns.take(self._stored(entry.key), 1)
        lse = rows.take(entry.lse.to(self.query.device), 1)
        return _shifted_weights(query, key, lse, keep, self.scaling, self.softcap)

    def stored_rows(self, entry: AttentionEntry, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of the stored map, recomputed from the entry's states and normaliser: (heads, n, L)
        float32."""
        query = self._stored(entry.query).index_select(1, rows)
        lse = entry.lse.to(self.query.device).index_select(1, rows)
        keep = entry.mask.to(self.keep.device).index_select(0, rows)
        return _shifted_weights(query, self._stored(entry.key), lse, keep, self.scaling, self.softcap)

    def _stored(self, states: torch.Tensor) -> torch.Tensor:
        """An entry's states on this row's device and in its dtype (``storage_dtype`` may differ)."""
        return states.to(device=self.query.device, dtype=self.query.dtype)


@dataclass
class Reuse:
    """How one request row reuses one entry: the positions whose queries changed (rows computed exactly) and whose
    keys changed or are masked differently (columns rescored), and the corrected normalisers.

    Only the *affected* rows are corrected: the reused rows that attend a changed column under the new mask or the
    stored one. Any other row gives those columns no weight in either map, so its stored row is already the new
    one (ratio 1, nothing to add or remove). In a causal decoder whose requests differ in their tail, that is every
    row before the first changed position: the correction of a templated prompt's hit shrinks from all L rows to
    the few after the first changed token."""

    entry_id: int
    similarity: float
    entry: AttentionEntry
    rows: Positions
    columns: Positions
    affected: Positions
    """Reused rows whose weights on the changed columns may differ (see above)."""
    column_weights: torch.Tensor | None = None
    """exp(new scores of the changed columns - stored log-normaliser), (heads, affected, columns), float32
    (``None``: nothing to correct)."""
    stored_columns: torch.Tensor | None = None
    """The stored map's weights on the changed columns, (heads, affected, columns), float32."""
    ratio: torch.Tensor | None = None
    """New normaliser / stored normaliser of the affected rows, (heads, affected), float32."""
    heads: torch.Tensor | None = None
    """Query heads whose verified rows were too far from exact: computed exactly, every row (``None``: none)."""

    @property
    def recomputed(self) -> int:
        return len(self.rows) + len(self.columns)

    def served_rows(self, row: Row, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of the corrected map, (heads, n, L) float32 (verification and ``output_attentions``)."""
        served = row.stored_rows(self.entry, rows)
        if self.column_weights is None:
            return served
        local = torch.full((row.length,), -1, dtype=torch.long, device=rows.device)
        local[self.affected.index] = torch.arange(len(self.affected), device=rows.device)
        local = local[rows]
        which = (local >= 0).nonzero().flatten()
        if not len(which):
            return served
        local = local[which]
        corrected = served.index_select(1, which)
        self.columns.put(corrected, 2, self.column_weights.index_select(1, local))
        corrected.div_(self.ratio.index_select(1, local)[..., None])
        return served.index_copy_(1, which, corrected)


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(heads, n, d) -> (kv_heads, groups * n, d): the query heads of one KV head stacked along the rows, so one
    product per KV head replaces repeating its keys (a copy of all of them) for every query head."""
    return query.reshape(kv_heads, -1, query.shape[-1])


def _grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``query key^T * scaling``, (heads, n, m) float32, for ``query`` (heads, n, d) and ``key`` (kv_heads, m, d)."""
    scores = torch.matmul(_grouped(query, key.shape[0]), key.transpose(-1, -2)).mul_(scaling)
    return scores.reshape(query.shape[0], query.shape[1], -1)


def _shifted_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    keep: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """``exp(query key^T * scaling - lse)``, 0 where ``keep`` is False: (heads, n, m) float32 for ``query``
    (heads, n, d), ``key`` (kv_heads, m, d) (GQA heads not repeated), ``lse`` (heads, n) and ``keep`` (n, m) or
    ``None`` (every key).

    The exponent is clamped to +-80 (weights below e^-80 of the normaliser are negligible): torch's ``exp`` is
    many times slower on the very negative scores of masked positions and on subnormal results. Computed in
    place after one fused ``baddbmm``: on a CPU, every fresh (heads, n, m) temporary costs page faults."""
    if softcap is None and query.dtype == torch.float32:
        heads, rows, kv_heads = query.shape[0], query.shape[1], key.shape[0]
        bias = lse.to(torch.float32).reshape(kv_heads, -1, 1).neg().expand(-1, -1, key.shape[1])
        weights = torch.baddbmm(bias, _grouped(query, kv_heads), key.transpose(-1, -2), alpha=scaling)
        weights = weights.view(heads, rows, -1)
    else:
        weights = masked_scores(query[None], key[None], None, scaling, softcap)[0].float()
        weights.sub_(lse[..., None])
    weights.clamp_(-_EXP_LIMIT, _EXP_LIMIT).exp_()
    # a multiply, not masked_fill_: a broadcast boolean fill is several times slower on a CPU
    return weights if keep is None else weights.mul_(keep.to(weights.dtype))


def _sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Fused attention of one request row's heads, (heads, n, d) against (kv_heads, L, d); ``keep`` (n, L) or
    ``None`` (every key)."""
    mask = None if keep is None else keep[None, None]
    out = nn.functional.scaled_dot_product_attention(
        query[None], key[None], value[None], attn_mask=mask, scale=scaling, enable_gqa=query.shape[0] != key.shape[0]
    )
    return out[0]


def position_norms(states: torch.Tensor) -> torch.Tensor:
    """(heads, L, d) -> (L,): the length of each position's states over all heads.

    Reduced in the order the memory runs: the states of a call are a view of the projection's (L, heads, d) output
    (values) or a (heads, L, d) tensor of their own (rotated queries and keys), and ``vector_norm`` over dims 0 and
    2 of the latter strides through memory (1.1 ms for SmolLM2's queries at 1,024 tokens, against 0.35 ms summing
    the heads' squares first). Planning a hit takes three such norms and three of differences."""
    if states.stride(0) > states.stride(1):  # heads outermost
        return states.float().square().sum(0).sum(-1).sqrt()
    return torch.linalg.vector_norm(states, dim=(0, 2), dtype=torch.float32)


def distance(states: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Per position, the L2 distance over all heads between this request's states and an entry's (kept in its
    storage dtype). Relative distance rather than cosine decides what changed: a state that only grows or shrinks
    changes how sharp attention is."""
    return position_norms(states.float() - stored.to(device=states.device, dtype=torch.float32))
