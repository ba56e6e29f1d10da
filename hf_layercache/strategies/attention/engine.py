"""The hit / miss engine of one cached layer (:class:`CachedAttention`): find and verify a stored map to reuse for
each request row, serve ``A @ V`` with its corrections, compute and store the misses.

The engine is built by the strategy (``attach``) with everything it uses: its layer, bank, gate and settings, the
lookup keys and reuse counters shared by the model's layers, and the cache's counters and event sinks. It never
sees the strategy, so it can be built and tested alone, and the package has no import circle."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...bank import CacheBank
from ...events import Lookup, Verdict
from ...layers import CachedLayer
from ...request import RequestScope
from ...stats import CacheStats
from .counters import ReuseCounters
from .eager import FusedMasks, attention_with_lse, fused, fused_masks, grouped_matmul
from .entry import AttentionEntry
from .function import default_attention
from .gate import CACHED, MEASURED, STORE, Gate, combine
from .keys import LookupKeys
from .masks import any_along, any_true
from .positions import Positions, request_patterns
from .request_state import EARLIER, FUSED_MASKS, NAMESPACE_KEY, PREFILL, WEIGHTS
from .rows import Reuse, Row, distance

RecordLookup = Callable[[Lookup, CacheBank, list[str]], None]
"""``StrategyContext.record_lookup``: one lookup's decision, for the bank's policy and the layer's stats."""
RecordVerdict = Callable[[Verdict, CacheBank, str], None]
"""``StrategyContext.record_verdict``: what verifying a candidate found, for the bank's policy and the layer's stats."""

_CANDIDATES = 2
_MAX_RECOMPUTED = 0.5
"""A candidate that would recompute more rows and columns than this fraction of the row's live positions (padding
aside), or more heads than this fraction of them, is a miss instead."""
_MAX_MOVED_WEIGHT = 0.5
"""A reused row whose stored weight on changed columns exceeds this is computed exactly instead."""


class CachedAttention:
    """The cached self-attention of one layer: its bank, threshold, and the hit / miss logic.

    A stored map ``A = exp(S - lse)`` stays exact for a new input wherever its queries (rows) and keys (columns)
    are unchanged. Rows whose query changed are computed exactly; for the other rows, the columns whose key changed
    are rescored and the row renormalised with the stored log-normaliser ``lse``:
    ``A'[p, c] = exp(S'[p, c] - lse[p]) / r[p]`` and ``A'[p, u] = A[p, u] / r[p]`` with
    ``r[p] = 1 - sum_c A[p, c] + sum_c exp(S'[p, c] - lse[p])``. That costs ``changed / L`` of a full ``QK^T``
    besides ``A @ V``. "Unchanged" means a relative L2 distance of at most ``attention_position_tolerance``
    between the position's states: ``|new - stored| <= tolerance * |new|``, over all heads (``threshold`` only
    preselects entries by the cosine of their pooled lookup keys).
    """

    def __init__(
        self,
        layer: CachedLayer,
        bank: CacheBank,
        threshold: float,
        *,
        tolerance: float,
        max_error: float,
        verify_rows: int,
        default_implementation: str,
        gate: Gate,
        keys: LookupKeys,
        reuse: ReuseCounters,
        counters: CacheStats,
        record_lookup: RecordLookup,
        record_verdict: RecordVerdict,
    ):
        self.layer = layer
        self.bank = bank
        self.threshold = threshold
        """Least cosine of the pooled lookup keys for an entry to be considered."""
        self.tolerance = tolerance
        """``attention_position_tolerance``: largest relative change of a position's states for its row (query) or
        column (key) to be reused."""
        self.max_error = max_error
        """``attention_max_error``: largest total variation distance of a verified row, per head."""
        self.verify_rows = verify_rows
        """``attention_verify_rows``: reused rows recomputed per candidate to check it (0: none)."""
        self.default_implementation = default_implementation
        """The attention implementation the model had before ``enable()``: what runs where the cache does not."""
        self.gate = gate
        """Per length bucket, whether this layer caches or runs the model's default attention."""
        self.keys = keys
        """The lookup keys (shared by the model's cached layers)."""
        self.reuse = reuse
        """How much of the stored maps hits reused (shared by the model's cached layers)."""
        self.counters = counters
        """The cache's per-layer counters: computed and bypassed rows."""
        self.record_lookup = record_lookup
        self.record_verdict = record_verdict

    def __call__(
        self,
        scope: RequestScope,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        softcap: float | None,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        arguments = (scope, module, query, key, value, mask, scaling, softcap, kwargs)
        rows, length = query.shape[0], key.shape[-2]
        if not scope.state.get(PREFILL, False) or query.shape[-2] != length:
            self.counters.record_bypass(self.layer.name, rows)
            return default_attention(self.default_implementation, *arguments)
        want_maps = scope.state.get(WEIGHTS, False)
        earlier = scope.state.setdefault(EARLIER, {})
        route = CACHED if want_maps else self.gate.route(length, rows, earlier.get(length))
        keep = _keep_mask(module, mask, query.shape[-2], length) if route in (CACHED, STORE) else None
        if keep is None:  # the cache cannot gain here (or cannot take this mask): no bookkeeping
            start = self.gate.clock()
            out = default_attention(self.default_implementation, *arguments)
            if route == MEASURED:
                self.gate.record_default(length, rows, self.gate.clock() - start)
            self.counters.record_bypass(self.layer.name, rows)
            return out
        return self._cached(scope, query, key, value, keep, scaling, softcap, want_maps, look=route != STORE)

    def _cached(
        self,
        scope: RequestScope,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        keep: torch.Tensor,
        scaling: float,
        softcap: float | None,
        want_maps: bool,
        look: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cached path: look up, serve the hits, compute and store the misses; its costs go to the gate.
        ``look=False`` (the gate's :data:`~.gate.STORE`): every row computed and stored, nothing looked up or
        measured."""
        start = self.gate.clock()
        keep = keep.expand(query.shape[0], 1, -1, -1)
        patterns = request_patterns(scope.state, keep)
        rows = [
            Row(query[b], key[b], value[b], keep[b, 0], patterns[b], scaling, softcap, self.tolerance)
            for b in range(query.shape[0])
        ]
        keys = self.keys(query, key)
        same = _identical_rows(rows, keys)
        unique = [b for b, first in enumerate(same) if first == b]
        self.reuse.count_duplicates(len(rows) - len(unique))
        searched = self.bank.count(scope.state[NAMESPACE_KEY]) > 0
        reuses = self._reuses(scope, rows, keys, unique) if look else {}
        if look:
            lookup = Lookup([(r.entry_id, r.similarity) for r in reuses.values()], len(unique) - len(reuses))
            self.record_lookup(lookup, self.bank, [self.layer.name])
        looked_up = self.gate.clock()
        outputs = {b: self._serve(reuse, rows[b], want_maps) for b, reuse in reuses.items()}
        served = self.gate.clock()
        misses = [b for b in unique if b not in outputs]
        seconds, whole = self._compute(scope, query, key, value, keep, rows, keys, misses, outputs, want_maps)
        self.counters.record_compute(self.layer.name, len(misses), seconds)
        computed = self.gate.clock()
        # every row computed as one batch: its output as it is; else the rows' outputs, restacked
        output = whole if whole is not None else _batched([outputs[first][0] for first in same])
        output = output.transpose(1, 2).contiguous()
        maps = _batched([outputs[first][1] for first in same]) if want_maps else None
        if look and not want_maps:  # the maps cost extra: such calls say nothing about the usual cost
            overhead = looked_up - start + self.gate.clock() - computed
            length = key.shape[-2]
            found = self.gate.record_cached(
                length, len(unique), len(reuses), searched, overhead, served - looked_up, computed - served
            )
            scope.state[EARLIER][length] = combine(scope.state[EARLIER].get(length), found)
        return output, maps

    # --- hits -------------------------------------------------------------------------------------------------------
    def _reuses(self, scope: RequestScope, rows: list[Row], keys: torch.Tensor, unique: list[int]) -> dict[int, Reuse]:
        """Per request row of ``unique`` (the batch's rows less those identical to an earlier one), the verified reuse
        of the best of the nearest entries, if any."""
        namespace = scope.state[NAMESPACE_KEY]
        own = self.bank.count(namespace)  # the tenant's entries size its search, never another tenant's
        if own == 0:
            return {}
        asked = keys if len(unique) == len(rows) else keys[unique]
        scores, ids = self.bank.search(asked, k=min(_CANDIDATES, own), namespace=namespace)
        found = {}
        for i, b in enumerate(unique):
            row = rows[b]
            reuse = self._first_plan(scope, row, scores[i].tolist(), ids[i].tolist())
            if reuse is None:
                continue
            self._rescore(reuse, row)
            errors = self._verify(reuse, row)
            if errors is not None:
                error = float(errors.max())
                acceptable = error <= self.max_error
                verdict = Verdict(reuse.entry_id, error, acceptable, explored=True)
                self.record_verdict(verdict, self.bank, self.layer.name)
                failed = (errors > self.max_error).nonzero().flatten()
                if len(failed) > len(errors) * _MAX_RECOMPUTED:  # most heads moved: the map is not this input's
                    continue
                reuse.heads = failed if len(failed) else None  # heads whose maps moved are computed exactly
            corrected = 0 if reuse.column_weights is None else len(reuse.affected)
            self.reuse.count(reuse.recomputed, row.length, reuse.heads, len(row.query), corrected)
            found[b] = reuse
        return found

    def _first_plan(
        self, scope: RequestScope, row: Row, similarities: list[float], entry_ids: list[int]
    ) -> Reuse | None:
        """The reuse of the most similar candidate above the threshold, of this namespace, that fits."""
        for similarity, entry_id in zip(similarities, entry_ids, strict=True):
            if entry_id < 0 or similarity < self.threshold:
                return None
            entry = self.bank.get(entry_id, scope.state[NAMESPACE_KEY])
            if entry is not None:
                plan = self._plan(entry_id, similarity, entry, row)
                if plan is not None:
                    return plan
        return None

    def _plan(self, entry_id: int, similarity: float, entry: AttentionEntry, row: Row) -> Reuse | None:
        """Which rows and columns of the stored map must be recomputed for this request row; ``None`` when the entry
        does not fit (other heads or length) or more than half of the map would be."""
        if entry.query.shape[:2] != row.query.shape[:2] or entry.key.shape[0] != row.key.shape[0]:
            return None
        # positions no query attends to (padding) influence nothing: their rows are served as stored, and their
        # columns carry no weight unless the masks differ there. A stored row that attended nothing has no
        # normaliser to rescore against: computed where it is live now.
        stored_keep = entry.mask.to(row.keep.device)
        changed_rows = (distance(row.query, entry.query) > row.query_limits) | row.pattern.empty
        changed_rows = (changed_rows | ~any_along(stored_keep, -1)) & row.pattern.live
        limit = row.pattern.live_count * _MAX_RECOMPUTED
        if int(changed_rows.sum()) > limit:  # unrelated content: known before comparing keys and values
            return None
        # a column is served from the stored map and the stored output while its key and value stayed put
        moved = distance(row.key, entry.key) > row.key_limits
        moved |= distance(row.value, entry.value) > row.value_limits
        changed_columns = moved & row.pattern.live
        masks_differ = row.keep != stored_keep
        if any_true(masks_differ):
            changed_columns |= any_along(masks_differ, 0)
        rows, columns = Positions(changed_rows.nonzero()[:, 0]), Positions(changed_columns.nonzero()[:, 0])
        if len(rows) + len(columns) > limit:
            return None
        return Reuse(entry_id, similarity, entry, rows, columns, _affected(row, stored_keep, changed_rows, columns))

    @staticmethod
    def _rescore(reuse: Reuse, row: Row) -> None:
        """New scores of the changed columns against the stored normaliser, and each row's normaliser ratio. Rows
        that had most of their weight on changed columns join the computed rows."""
        rows = reuse.affected
        if not len(rows):
            return
        lse = reuse.entry.lse.to(row.query.device)
        weights = row.column_weights(reuse.columns, rows, lse)
        stored = row.stored_column_weights(reuse.entry, reuse.columns, rows)
        moved = stored.sum(-1)
        ratio = 1.0 - moved + weights.sum(-1)
        # rows that kept less than half their weight have little to reuse (and 1 - moved would lose precision)
        valid = (moved <= _MAX_MOVED_WEIGHT) & (ratio > 0)
        broken = rows.index[any_along(~valid, 0)]
        if broken.numel():
            reuse.rows = reuse.rows.union(broken)
            ratio = torch.where(valid, ratio, torch.ones_like(ratio))
        reuse.column_weights, reuse.stored_columns, reuse.ratio = weights, stored, ratio

    def _verify(self, reuse: Reuse, row: Row) -> torch.Tensor | None:
        """Per head, the largest total variation distance between the served and the exactly computed map over a
        few reused rows of live positions (``None`` when verification is off or every such row is computed)."""
        reused = row.pattern.live.clone()
        reused[reuse.rows.index] = False
        checked = _verified_positions(reused.nonzero().flatten(), self.verify_rows)
        if checked is None:
            return None
        checked = Positions(checked)
        exact = row.exact_rows(checked).float()
        return 0.5 * (exact - reuse.served_rows(row, checked.index)).abs().sum(-1).amax(-1)

    @staticmethod
    def _serve(reuse: Reuse, row: Row, want_map: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``A' @ V`` for one request row, (heads, L, d), without a full ``A @ V``: the stored output, corrected at
        the changed columns (``(O - A[:, C] V_old[C] + W'[:, C] V[C]) / r``), the changed rows and the heads that
        failed verification computed exactly (with sdpa where it applies). The corrected map itself is only built
        when ``output_attentions`` asks for it."""
        device, dtype = row.query.device, row.query.dtype
        output = reuse.entry.output.to(device=device, dtype=dtype, copy=True)
        if reuse.column_weights is not None:  # the affected rows only: the others' stored output is already theirs
            new_values = reuse.columns.take(row.value, 1)
            old_values = reuse.columns.take(reuse.entry.value, 1).to(device=device, dtype=dtype)
            corrected = reuse.affected.take(output, 1).to(dtype=torch.float32, copy=True)
            corrected += grouped_matmul(reuse.column_weights, new_values.float())
            corrected -= grouped_matmul(reuse.stored_columns, old_values.float())
            corrected /= reuse.ratio[..., None]
            reuse.affected.put(output, 1, corrected.to(dtype))
        if len(reuse.rows):
            reuse.rows.put(output, 1, row.exact_outputs(reuse.rows))
        heads = reuse.heads
        if heads is not None:
            output.index_copy_(0, heads, row.exact_head_outputs(heads))
        if not want_map:
            return output, None
        full = reuse.served_rows(row, torch.arange(row.length, device=device)).to(dtype)
        if len(reuse.rows):
            reuse.rows.put(full, 1, row.exact_rows(reuse.rows))
        if heads is not None:
            full.index_copy_(0, heads, row.exact_head_maps(heads))
        return output, full

    # --- misses -----------------------------------------------------------------------------------------------------
    def _compute(
        self,
        scope: RequestScope,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        keep: torch.Tensor,
        rows: list[Row],
        keys: torch.Tensor,
        misses: list[int],
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
        want_maps: bool,
    ) -> tuple[float, torch.Tensor | None]:
        """Exact attention of the missed rows only (a sub-batch), their entries stored. Returns the seconds it
        took and, when the missed rows are the whole batch, its (batch, heads, L, d) output."""
        if not misses:
            return 0.0, None
        start = time.perf_counter()
        whole = len(misses) == len(rows)
        index = None if whole else torch.tensor(misses, device=query.device)
        first = rows[misses[0]]
        masks = None
        if fused(query, want_maps, first.softcap):  # the same mask in every layer: worked out once per request
            masks = _request_fused_masks(scope.state, keep, query.dtype)
            masks = masks if whole else tuple(None if m is None else m[index] for m in masks)
        if not whole:
            query, key, value, keep = query[index], key[index], value[index], keep[index]
        output, lse, weights = attention_with_lse(
            query, key, value, keep, first.scaling, first.softcap, want_maps, masks
        )
        for i, b in enumerate(misses):
            outputs[b] = (output[i], None if weights is None else weights[i])
        seconds = time.perf_counter() - start
        for i, b in enumerate(misses):
            row = rows[b]
            entry = AttentionEntry(lse[i], row.keep, row.query, row.key, row.value, output[i])
            self.bank.put(entry, key=keys[b], cost=seconds / len(misses), namespace=scope.state[NAMESPACE_KEY])
        return seconds, output if whole else None


def _affected(row: Row, stored_keep: torch.Tensor, changed_rows: torch.Tensor, columns: Positions) -> Positions:
    """The reused rows whose weights on the changed ``columns`` may differ from the stored map's: those that attend
    one of them under the new mask or the stored one (see :class:`~.rows.Reuse`)."""
    if not len(columns):
        return Positions(columns.index)
    attends = any_along(columns.take(row.keep, 1), -1) | any_along(columns.take(stored_keep, 1), -1)
    return Positions((attends & ~changed_rows).nonzero()[:, 0])


def _batched(rows: list[torch.Tensor]) -> torch.Tensor:
    """The rows' tensors as one batch: a view for a single row (``stack`` would copy it)."""
    return rows[0][None] if len(rows) == 1 else torch.stack(rows)


def _request_fused_masks(state: dict[str, Any], keep: torch.Tensor, dtype: torch.dtype) -> FusedMasks:
    """:func:`~.eager.fused_masks` of ``keep``, kept in the request's ``state``: the model passes every layer the
    same mask tensor, so only the first layer's miss builds the additive mask (an ``L^2`` pass per row)."""
    cache = state.setdefault(FUSED_MASKS, {})
    signature = (keep.data_ptr(), tuple(keep.shape), keep.stride(), dtype)
    if signature not in cache:
        cache[signature] = fused_masks(keep, dtype)
    return cache[signature]


def _identical_rows(rows: list[Row], keys: torch.Tensor) -> list[int]:
    """Per batch row, the first row of the batch identical to it (its own index when there is none): identical rows
    are looked up, served or computed, and stored once. Rows with equal lookup keys are compared state by state, so
    equal keys alone never make two rows one."""
    same = list(range(len(rows)))
    if len(rows) < 2:
        return same
    firsts: dict[tuple[float, ...], list[int]] = {}
    for b, signature in enumerate(map(tuple, keys.tolist())):
        candidates = firsts.setdefault(signature, [])
        match = next((a for a in candidates if rows[a].same_states(rows[b])), None)
        if match is None:
            candidates.append(b)
        else:
            same[b] = match
    return same


def _keep_mask(module: nn.Module, mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
    """The (batch, 1, q, kv) boolean pattern of a call, or ``None`` when the cached path cannot use it (an additive
    float mask may carry biases a stored map knows nothing of; a per-head mask is not kept with the map)."""
    if mask is None:
        keep = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=_module_device(module))
        return keep.tril() if getattr(module, "is_causal", False) and q_len > 1 else keep
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    return mask


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _verified_positions(candidates: torch.Tensor, count: int) -> torch.Tensor | None:
    """Up to ``count`` (``attention_verify_rows``) evenly spaced positions of ``candidates``, the last included
    (where a causal row attends the most keys), recomputed to check a hit; ``None`` when verification is off or there
    is nothing to check."""
    count = min(count, candidates.numel())
    if count == 0:
        return None
    picks = torch.linspace(candidates.numel() - 1, 0, count, device=candidates.device).round().long()
    return candidates[picks.flip(0)]
