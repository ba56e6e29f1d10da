"""The hit / miss engine of one cached layer (:class:`CachedAttention`): find and verify a stored map to reuse for
each request row, serve ``A @ V`` with its corrections, compute and store the misses."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...bank import CacheBank, Lookup
from ...layers import CachedLayer
from ...request import RequestScope
from .eager import grouped_matmul, masked_scores
from .entry import AttentionEntry
from .function import WEIGHTS, default_attention
from .gate import DEFAULT, Gate
from .positions import _Positions
from .rows import _distance, _Reuse, _Row

if TYPE_CHECKING:
    from .strategy import AttentionStrategy

# keys of the request scope's state: written by the strategy (``begin_request``, ``patterns``), read here
_PREFILL = "attention.prefill"
_NAMESPACE = "attention.namespace"
_PATTERNS = "attention.patterns"
_CANDIDATES = 2
_MAX_RECOMPUTED = 0.5
"""A candidate that would recompute more rows and columns than this fraction of the length is a miss instead."""
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

    def __init__(self, strategy: AttentionStrategy, layer: CachedLayer, bank: CacheBank, threshold: float):
        self.strategy = strategy
        self.layer = layer
        self.bank = bank
        self.threshold = threshold
        """Least cosine of the pooled lookup keys for an entry to be considered."""
        self.tolerance = strategy.config.attention_position_tolerance
        """Largest relative change of a position's states for its row (query) or column (key) to be reused."""
        self.gate = Gate(strategy.config.attention_gate_interval)
        """Per length bucket, whether this layer caches or runs the model's default attention."""

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
        stats = self.strategy.controller.stats_
        keep = _keep_mask(module, mask, query.shape[-2], key.shape[-2])
        arguments = (scope, module, query, key, value, mask, scaling, softcap, kwargs)
        if keep is None or not scope.state.get(_PREFILL, False) or query.shape[-2] != key.shape[-2]:
            stats.record_bypass(self.layer.name, query.shape[0])
            return default_attention(self.strategy.default_implementation, *arguments)
        want_maps = scope.state.get(WEIGHTS, False)
        length = key.shape[-2]
        if not want_maps and self.gate.route(length) == DEFAULT:  # the cache cannot gain here: no bookkeeping
            start = time.perf_counter()
            out = default_attention(self.strategy.default_implementation, *arguments)
            self.gate.record_default(length, query.shape[0], time.perf_counter() - start)
            stats.record_bypass(self.layer.name, query.shape[0])
            return out
        return self._cached(scope, query, key, value, keep, scaling, softcap, want_maps)

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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cached path: look up, serve the hits, compute and store the misses; its costs go to the gate."""
        start = time.perf_counter()
        keep = keep.expand(query.shape[0], 1, -1, -1)
        patterns = self.strategy.patterns(scope, keep)
        rows = [
            _Row(query[b], key[b], value[b], keep[b, 0], patterns[b], scaling, softcap, self.tolerance)
            for b in range(query.shape[0])
        ]
        keys = self.strategy.lookup_keys(query, key)
        searched = len(self.bank) > 0
        reuses = self._reuses(scope, rows, keys)
        lookup = Lookup([(reuse.entry_id, reuse.similarity) for reuse in reuses.values()], len(rows) - len(reuses))
        self.strategy.controller.record_lookup(lookup, self.bank, [self.layer.name])
        looked_up = time.perf_counter()
        outputs = {b: self._serve(reuse, rows[b], want_maps) for b, reuse in reuses.items()}
        served = time.perf_counter()
        misses = [b for b in range(len(rows)) if b not in outputs]
        seconds = self._compute(scope, query, key, keep, rows, keys, misses, outputs)
        self.strategy.controller.stats_.record_compute(self.layer.name, len(misses), seconds)
        computed = time.perf_counter()
        output = torch.stack([outputs[b][0] for b in range(len(rows))]).transpose(1, 2).contiguous()
        maps = torch.stack([outputs[b][1] for b in range(len(rows))]) if want_maps else None
        if not want_maps:  # the maps cost extra: such calls say nothing about the usual cost
            overhead = looked_up - start + time.perf_counter() - computed
            self.gate.record_cached(
                key.shape[-2], len(rows), len(reuses), searched, overhead, served - looked_up, computed - served
            )
        return output, maps

    # --- hits -------------------------------------------------------------------------------------------------------
    def _reuses(self, scope: RequestScope, rows: list[_Row], keys: torch.Tensor) -> dict[int, _Reuse]:
        """Per request row, the verified reuse of the best of the nearest entries, if any."""
        if len(self.bank) == 0:
            return {}
        scores, ids = self.bank.search(keys, k=min(_CANDIDATES, len(self.bank)), namespace=scope.state[_NAMESPACE])
        found = {}
        for b, row in enumerate(rows):
            reuse = self._first_plan(scope, row, scores[b].tolist(), ids[b].tolist())
            if reuse is None:
                continue
            self._rescore(reuse, row)
            error = self._verify(reuse, row)
            if error is not None:
                acceptable = error <= self.strategy.max_error
                self.strategy.controller.stats_.record_error(self.layer.name, error, acceptable, explored=True)
            if error is not None and error > self.strategy.max_error:
                self.bank.record_error(reuse.entry_id, error)
                continue
            self.strategy.count_reuse(reuse.recomputed, row.length)
            found[b] = reuse
        return found

    def _first_plan(
        self, scope: RequestScope, row: _Row, similarities: list[float], entry_ids: list[int]
    ) -> _Reuse | None:
        """The reuse of the most similar candidate above the threshold, of this namespace, that fits."""
        for similarity, entry_id in zip(similarities, entry_ids, strict=True):
            if entry_id < 0 or similarity < self.threshold:
                return None
            values = self.bank.get(entry_id, scope.state[_NAMESPACE])
            if values is not None:
                plan = self._plan(entry_id, similarity, AttentionEntry.from_tensors(values), row)
                if plan is not None:
                    return plan
        return None

    def _plan(self, entry_id: int, similarity: float, entry: AttentionEntry, row: _Row) -> _Reuse | None:
        """Which rows and columns of the stored map must be recomputed for this request row; ``None`` when the entry
        does not fit (other heads or length) or more than half of the map would be."""
        if tuple(entry.map.shape) != (row.query.shape[0], row.length, row.length):
            return None
        # positions no query attends to (padding) influence nothing: their rows are served as stored, and their
        # columns carry no weight unless the masks differ there
        changed_rows = (_distance(row.query, entry.query) > row.query_limits) | row.pattern.empty
        changed_rows &= row.pattern.live
        changed_columns = (_distance(row.key, entry.key) > row.key_limits) & row.pattern.live
        stored_keep = entry.mask.to(row.keep.device)
        if not torch.equal(stored_keep, row.keep):
            changed_columns |= (row.keep != stored_keep).any(0)
        reuse = _Reuse(
            entry_id,
            similarity,
            entry,
            _Positions(changed_rows.nonzero()[:, 0]),
            _Positions(changed_columns.nonzero()[:, 0]),
        )
        return None if reuse.recomputed > row.length * _MAX_RECOMPUTED else reuse

    @staticmethod
    def _rescore(reuse: _Reuse, row: _Row) -> None:
        """New scores of the changed columns against the stored normaliser, and each row's normaliser ratio. Rows
        that had most of their weight on changed columns join the computed rows."""
        if not len(reuse.columns):
            return
        lse = reuse.entry.lse.to(row.query.device)
        weights = row.column_weights(reuse.columns, lse)
        stored = reuse.columns.take(reuse.entry.map, 2).to(device=row.query.device, dtype=torch.float32)
        reuse.stored_columns = stored
        moved = stored.sum(-1)
        ratio = 1.0 - moved + weights.sum(-1)
        # rows that kept less than half their weight have little to reuse (and 1 - moved would lose precision)
        valid = (moved <= _MAX_MOVED_WEIGHT) & (ratio > 0)
        broken = (~valid).any(0).nonzero().flatten()
        if broken.numel():
            reuse.rows = reuse.rows.union(broken)
            ratio = torch.where(valid, ratio, torch.ones_like(ratio))
        reuse.column_weights, reuse.ratio = weights, ratio

    def _verify(self, reuse: _Reuse, row: _Row) -> float | None:
        """Largest total variation distance between the served and the exactly computed map, over a few reused rows
        of live positions, every head (``None`` when verification is off or every such row is computed anyway)."""
        reused = row.pattern.live.clone()
        reused[reuse.rows.index] = False
        checked = self.strategy.verify_rows(reused.nonzero().flatten())
        if checked is None:
            return None
        checked = _Positions(checked)
        exact = row.exact_rows(checked).float()
        return float(0.5 * (exact - reuse.served_rows(checked.index)).abs().sum(-1).max())

    @staticmethod
    def _serve(reuse: _Reuse, row: _Row, want_map: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``A' @ V`` for one request row, (heads, L, d): the stored ``A @ V`` plus corrections of rank ``changed``.
        The corrected map itself is only built when ``output_attentions`` asks for it."""
        stored = reuse.entry.map.to(device=row.query.device, dtype=row.query.dtype)
        output = grouped_matmul(stored, row.value)
        if len(reuse.columns):
            delta = (reuse.column_weights - reuse.stored_columns).to(row.value.dtype)
            output = grouped_matmul(delta, reuse.columns.take(row.value, 1)).add_(output)
            output.div_(reuse.ratio[..., None].to(row.value.dtype))
        exact = row.exact_rows(reuse.rows) if len(reuse.rows) else None
        if exact is not None:
            reuse.rows.put(output, 1, grouped_matmul(exact, row.value))
        if not want_map:
            return output, None
        full = reuse.served_rows(torch.arange(row.length, device=row.query.device)).to(row.query.dtype)
        if exact is not None:
            reuse.rows.put(full, 1, exact)
        return output, full

    # --- misses -----------------------------------------------------------------------------------------------------
    def _compute(
        self,
        scope: RequestScope,
        query: torch.Tensor,
        key: torch.Tensor,
        keep: torch.Tensor,
        rows: list[_Row],
        keys: torch.Tensor,
        misses: list[int],
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
    ) -> float:
        """Exact attention of the missed rows only (a sub-batch), their maps stored. Returns the seconds it took."""
        if not misses:
            return 0.0
        start = time.perf_counter()
        index = torch.tensor(misses, device=query.device)
        first = rows[misses[0]]
        scores = masked_scores(query[index], key[index], keep[index], first.scaling, first.softcap)
        weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        for i, b in enumerate(misses):
            outputs[b] = (grouped_matmul(weights[i], rows[b].value), weights[i])
        seconds = time.perf_counter() - start
        # log-normaliser from the softmax already computed: lse = max score - log(max weight), two reductions
        lse = scores.amax(-1).float() - weights.amax(-1).float().log()
        for i, b in enumerate(misses):
            entry = AttentionEntry(weights[i], lse[i], rows[b].keep, rows[b].query, rows[b].key)
            self.bank.put(
                entry.to_tensors(), key=keys[b], cost=seconds / len(misses), namespace=scope.state[_NAMESPACE]
            )
        return seconds


def _keep_mask(module: nn.Module, mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
    """The (batch, 1, q, kv) boolean pattern of a call, or ``None`` when the cached path cannot use it (an additive
    float mask may carry biases a stored map knows nothing of; a per-head mask is not kept with the map)."""
    if mask is None:
        keep = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=module_device(module))
        return keep.tril() if getattr(module, "is_causal", False) and q_len > 1 else keep
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    return mask


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
