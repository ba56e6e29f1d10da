"""``attention``: reuse of softmax attention maps across similar requests in prefill (AttnCache).

How it works, per cached layer:

* The strategy registers one attention function with transformers' ``AttentionInterface`` and, under the same
  name, a mask function with ``AttentionMaskInterface`` (without it, models built on ``masking_utils`` pass no mask
  at all to a custom attention function). It selects them with ``model.set_attn_implementation`` and puts the
  previous implementation back on ``detach``.
* Lookup: the layer's query and key states, mean-pooled over a few position segments and randomly projected (fixed
  seed) to ``attention_key_dim`` dimensions, find the nearest stored maps through the configured backend.
* Hit: the stored map ``A`` (all heads) stands in for ``softmax(QK^T)``; only ``A @ V`` is computed, ``Q``/``K``/``V``
  are still projected (a decoder's KV cache stays exact). Per position, the new request's query and key states are
  compared with the stored ones: rows whose query moved are computed exactly, columns whose key moved (or whose mask
  differs) are rescored and their rows renormalised with the stored log-normaliser, so positions that did not move
  are served exactly. A few reused rows are recomputed to verify the result (``attention_verify_rows``,
  ``attention_max_error``); a candidate that fails is a miss.
* Miss: eager attention (the models' own math) for the missed rows only; their maps are stored.

Decode steps (queries shorter than keys) and calls the cached path cannot take compute eagerly, as does every
attention module the strategy does not cache (cross-attention, unselected layers). See docs/attention.md.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..bank import CacheBank
from ..kv import find_cache, past_length
from ..layers import CachedLayer
from ..registry import register_strategy
from ..request import RequestScope, current_scope, namespace_tag
from .base import Strategy

ATTN_IMPLEMENTATION = "hf_layercache"
"""The name under which the attention and mask functions are registered with transformers."""

_PREFILL = "attention.prefill"
_WEIGHTS = "attention.weights"
_NAMESPACE = "attention.namespace"
_PATTERNS = "attention.patterns"
_CANDIDATES = 2
_MAX_RECOMPUTED = 0.5
"""A candidate that would recompute more rows and columns than this fraction of the length is a miss instead."""
_MERGE_GAP = 8
"""Changed positions at most this far apart are recomputed as one run, with the unchanged ones between them."""
_MAX_RUNS = 8
"""Changed positions in more runs than this are gathered by index instead of sliced run by run."""
_EXP_LIMIT = 80.0
_MAX_MOVED_WEIGHT = 0.5
"""A reused row whose stored weight on changed columns exceeds this is computed exactly instead."""
_PROJECTION_SEED = 0x5EED
_KNOWN_KWARGS = frozenset(
    {
        "softcap",  # applied
        "sliding_window",  # already in the mask the registered mask function builds
        "is_causal",
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "token_type_ids",
    }
)
"""Keyword arguments of attention functions that do not change the math beyond the mask. Any other one with a value
(T5's ``position_bias``, gpt-oss's ``s_aux`` sinks) is refused rather than silently ignored."""

# attention module -> its cached layer; weak, so a model that is dropped without ``disable`` is still collected
_MODULE_ATTR = "_layer_cache_attention"
"""Instance attribute of a cached attention module: its :class:`CachedAttention` (set through the hook registry)."""
_users = 0
"""Models whose cache has the attention functions registered; the last to detach unregisters them."""
_users_lock = threading.Lock()


def _register_functions() -> None:
    global _users
    with _users_lock:
        if _users == 0:
            AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
            AttentionMaskInterface.register(ATTN_IMPLEMENTATION, boolean_mask)
        _users += 1


def _unregister_functions() -> None:
    global _users
    with _users_lock:
        _users -= 1
        if _users == 0:  # transformers' registries have no unregister: their class-wide mappings are dicts
            AttentionInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
            AttentionMaskInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)


_DISPATCHES: dict[type, bool] = {}


# --- the functions transformers calls -------------------------------------------------------------------------------
def boolean_mask(*args: Any, **kwargs: Any) -> torch.Tensor:
    """The mask function registered beside the attention: always a ``(batch, 1, q, kv)`` boolean mask (``True``
    attends). It never returns ``None`` (sdpa's shortcut for "causal" or "no padding"), so every call sees the real
    pattern, which the cached path applies to stored maps."""
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: the cached path for modules the strategy caches, eager math otherwise."""
    unsupported = sorted(name for name, value in kwargs.items() if value is not None and name not in _KNOWN_KWARGS)
    if unsupported:
        raise ValueError(
            f"strategy='attention' computes softmax(QK^T * scaling + mask) @ V, but {type(module).__name__} passes "
            f"{unsupported} to its attention function (position biases, attention sinks, ...), which that does not "
            f"model. Allowed extra arguments: {sorted(_KNOWN_KWARGS)}. Use another strategy for this model."
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    cached = module.__dict__.get(_MODULE_ATTR)
    scope = current_scope()
    if cached is None or scope is None or scope.bypass_reason is not None or module.training or dropout:
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout, softcap)
    return cached(scope, module, query, key, value, attention_mask, scaling, softcap)


# --- eager math -----------------------------------------------------------------------------------------------------
def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, L, d) -> (batch, kv_heads * groups, L, d), each KV head repeated for its query heads."""
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def masked_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """``QK^T * scaling`` (soft-capped) with masked positions at the dtype's minimum, as eager attention adds them."""
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask[..., : key.shape[-2]]


def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """``softmax(QK^T * scaling + mask)`` as the models' eager functions compute it (softmax in float32)."""
    scores = masked_scores(query, key, mask, scaling, softcap)
    return nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention: what BERT's and Llama's ``eager_attention_forward`` compute (GQA heads repeated)."""
    weights = attention_scores(query, key, mask, scaling, softcap)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, repeat_kv(value, query.shape[1] // value.shape[1]))
    return output.transpose(1, 2).contiguous(), weights


def grouped_matmul(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``weights @ repeat_kv(value)`` for one row, (heads, n, m) @ (kv_heads, m, d) -> (heads, n, d), without
    repeating ``value``: the query heads of one KV head are stacked along the rows instead."""
    heads, rows, _ = weights.shape
    out = torch.matmul(weights.reshape(value.shape[0], -1, weights.shape[-1]), value)
    return out.reshape(heads, rows, -1)


# --- the cached path ------------------------------------------------------------------------------------------------
class _Positions:
    """A sorted set of positions, read and written as contiguous runs when it has few of them: on a (heads, L, L)
    map, slicing the columns of a run costs a small fraction of gathering the same columns by index. Short gaps
    between runs are filled in (recomputing an unchanged position exactly is harmless)."""

    def __init__(self, index: torch.Tensor):
        runs: list[list[int]] = []
        for position in index.tolist():
            if runs and position - runs[-1][1] <= _MERGE_GAP:
                runs[-1][1] = position + 1
            else:
                runs.append([position, position + 1])
        if len(runs) > _MAX_RUNS:
            self.index, self.runs = index, None
        else:  # positions inside a merged gap are recomputed too: exact either way, and cheaper than a gather
            self.index = torch.cat([torch.arange(a, b, device=index.device) for a, b in runs]) if runs else index
            self.runs = runs

    def __len__(self) -> int:
        return self.index.numel()

    def union(self, other: torch.Tensor) -> _Positions:
        return _Positions(torch.unique(torch.cat([self.index, other])))

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """``tensor`` restricted to these positions along ``dim`` (a view when they form one run: read only)."""
        if self.runs is None:
            return tensor.index_select(dim, self.index)
        parts = [tensor.narrow(dim, start, stop - start) for start, stop in self.runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def put(self, tensor: torch.Tensor, dim: int, values: torch.Tensor) -> None:
        """Write ``values`` (as :meth:`take` would have read them) into ``tensor`` in place."""
        if self.runs is None:
            tensor.index_copy_(dim, self.index, values)
            return
        offset = 0
        for start, stop in self.runs:
            tensor.narrow(dim, start, stop - start).copy_(values.narrow(dim, offset, stop - start))
            offset += stop - start


@dataclass
class _Pattern:
    """What a request row's (L, L) mask says, worked out once per request: every layer gets the same mask."""

    live: torch.Tensor
    """Positions some query attends to. The others (padding) influence no other position: their rows are served
    as stored and never verified."""
    empty: torch.Tensor
    """Queries with nothing to attend to (eager gives them a uniform row); computed when live."""
    full: bool
    """Every query attends every key (no padding, bidirectional): masking is skipped."""

    @classmethod
    def of(cls, keep: torch.Tensor) -> _Pattern:
        return cls(keep.any(0), ~keep.any(-1), bool(keep.all()))


@dataclass(eq=False)
class _Row:
    """One request row of an attention call: its states (heads first), its mask pattern, the call's scaling."""

    query: torch.Tensor
    """(heads, L, d)"""
    key: torch.Tensor
    """(kv_heads, L, d)"""
    value: torch.Tensor
    """(kv_heads, L, d)"""
    keep: torch.Tensor
    """(L, L) bool, True where a query may attend"""
    pattern: _Pattern
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
        return self.tolerance * _norms(self.query)

    @functools.cached_property
    def key_limits(self) -> torch.Tensor:
        """Per position, the distance from a stored key beyond which the position's column counts as changed."""
        return self.tolerance * _norms(self.key)

    def exact_rows(self, rows: _Positions) -> torch.Tensor:
        """Exact attention rows ``rows``: (heads, n, L)."""
        keep = None if self.pattern.full else rows.take(self.keep, 0)[None, None]
        return attention_scores(rows.take(self.query, 1)[None], self.key[None], keep, self.scaling, self.softcap)[0]

    def column_weights(self, columns: _Positions, lse: torch.Tensor) -> torch.Tensor:
        """``exp(S[:, c] - lse)`` for the keys ``columns``, 0 where masked: (heads, L, n) float32.

        The exponent is clamped to +-80 (weights below e^-80 of the normaliser are negligible): torch's ``exp`` is
        many times slower on the very negative scores of masked positions and on subnormal results."""
        scores = masked_scores(self.query[None], columns.take(self.key, 1)[None], None, self.scaling, self.softcap)[0]
        weights = (scores.float() - lse[..., None]).clamp_(-_EXP_LIMIT, _EXP_LIMIT).exp_()
        return weights if self.pattern.full else weights.masked_fill_(~columns.take(self.keep, 1), 0.0)


@dataclass
class _Reuse:
    """How one request row reuses one entry: the positions whose queries changed (rows computed exactly) and whose
    keys changed or are masked differently (columns rescored), and the corrected normalisers."""

    entry_id: int
    similarity: float
    values: dict[str, torch.Tensor]
    rows: _Positions
    columns: _Positions
    column_weights: torch.Tensor | None = None
    """exp(new scores of the changed columns - stored log-normaliser), (heads, L, columns), float32."""
    stored_columns: torch.Tensor | None = None
    """The stored map's weights on the changed columns, (heads, L, columns), float32."""
    ratio: torch.Tensor | None = None
    """New normaliser / stored normaliser, (heads, L), float32."""

    @property
    def recomputed(self) -> int:
        return len(self.rows) + len(self.columns)

    def served_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of the corrected map, (heads, n, L) float32 (verification and ``output_attentions``)."""
        served = self.values["map"].index_select(1, rows).float()  # a copy: written below
        if len(self.columns):
            self.columns.put(served, 2, self.column_weights.index_select(1, rows))
            served = served / self.ratio[:, rows, None]
        return served


class CachedAttention:
    """The cached self-attention of one layer: its bank, threshold, and the hit / miss logic.

    A stored map ``A = exp(S - lse)`` stays exact for a new input wherever its queries (rows) and keys (columns)
    are unchanged. Rows whose query changed are computed exactly; for the other rows, the columns whose key changed
    are rescored and the row renormalised with the stored log-normaliser ``lse``:
    ``A'[p, c] = exp(S'[p, c] - lse[p]) / r[p]`` and ``A'[p, u] = A[p, u] / r[p]`` with
    ``r[p] = 1 - sum_c A[p, c] + sum_c exp(S'[p, c] - lse[p])``. That costs ``changed / L`` of a full ``QK^T``
    besides ``A @ V``. "Unchanged" means a cosine of at least ``threshold`` between the position's states.
    """

    def __init__(self, strategy: AttentionStrategy, layer: CachedLayer, bank: CacheBank, threshold: float):
        self.strategy = strategy
        self.layer = layer
        self.bank = bank
        self.threshold = threshold
        """Least cosine of the pooled lookup keys for an entry to be considered."""
        self.tolerance = strategy.config.attention_position_tolerance
        """Largest relative change of a position's states for its row (query) or column (key) to be reused."""

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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        stats = self.strategy.controller.stats_
        keep = _keep_mask(module, mask, query.shape[-2], key.shape[-2])
        if keep is None or not scope.state.get(_PREFILL, False) or query.shape[-2] != key.shape[-2]:
            stats.record_bypass(self.layer.name, query.shape[0])
            return eager_attention(module, query, key, value, mask, scaling, softcap=softcap)
        keep = keep.expand(query.shape[0], 1, -1, -1)
        patterns = self.strategy.patterns(scope, keep)
        rows = [
            _Row(query[b], key[b], value[b], keep[b, 0], patterns[b], scaling, softcap, self.tolerance)
            for b in range(query.shape[0])
        ]
        keys = self.strategy.lookup_keys(query, key)
        want_maps = scope.state.get(_WEIGHTS, False)
        outputs = {b: self._serve(reuse, rows[b], want_maps) for b, reuse in self._reuses(scope, rows, keys).items()}
        misses = [b for b in range(len(rows)) if b not in outputs]
        seconds = self._compute(scope, query, key, keep, rows, keys, misses, outputs)
        stats.record(self.layer.name, hits=len(rows) - len(misses), misses=len(misses), compute_seconds=seconds)
        output = torch.stack([outputs[b][0] for b in range(len(rows))]).transpose(1, 2).contiguous()
        if not want_maps:
            return output, None
        return output, torch.stack([outputs[b][1] for b in range(len(rows))])

    # --- hits -------------------------------------------------------------------------------------------------------
    def _reuses(self, scope: RequestScope, rows: list[_Row], keys: torch.Tensor) -> dict[int, _Reuse]:
        """Per request row, the verified reuse of the best of the nearest entries, if any."""
        if len(self.bank) == 0:
            return {}
        scores, ids = self.bank.search(keys, k=min(_CANDIDATES, len(self.bank)))
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
            self.bank.record_hit(reuse.entry_id, reuse.similarity)
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
            values = self.bank.get(entry_id)
            if values is not None and torch.equal(values["namespace"], scope.state[_NAMESPACE]):
                plan = self._plan(entry_id, similarity, values, row)
                if plan is not None:
                    return plan
        return None

    def _plan(self, entry_id: int, similarity: float, values: dict[str, torch.Tensor], row: _Row) -> _Reuse | None:
        """Which rows and columns of the stored map must be recomputed for this request row; ``None`` when the entry
        does not fit (other heads or length) or more than half of the map would be."""
        if tuple(values["map"].shape) != (row.query.shape[0], row.length, row.length):
            return None
        # positions no query attends to (padding) influence nothing: their rows are served as stored, and their
        # columns carry no weight unless the masks differ there
        changed_rows = (_distance(row.query, values["query"]) > row.query_limits) | row.pattern.empty
        changed_rows &= row.pattern.live
        changed_columns = (_distance(row.key, values["key"]) > row.key_limits) & row.pattern.live
        stored_keep = values["mask"].to(row.keep.device)
        if not torch.equal(stored_keep, row.keep):
            changed_columns |= (row.keep != stored_keep).any(0)
        reuse = _Reuse(
            entry_id,
            similarity,
            values,
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
        lse = reuse.values["lse"].view(torch.float32).to(row.query.device)
        weights = row.column_weights(reuse.columns, lse)
        stored = reuse.columns.take(reuse.values["map"], 2).to(device=row.query.device, dtype=torch.float32)
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
        stored = reuse.values["map"].to(device=row.query.device, dtype=row.query.dtype)
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
            values = {
                "map": weights[i],
                "lse": lse[i].view(torch.int32),  # bit-exact: storage_dtype must not round the normaliser
                "mask": rows[b].keep,
                "query": rows[b].query,
                "key": rows[b].key,
                "namespace": scope.state[_NAMESPACE].clone(),  # its own storage: shared tensors cannot be saved
            }
            self.bank.put(values, key=keys[b], cost=seconds / len(misses))
            self.bank.record_miss()
        return seconds


def _norms(states: torch.Tensor) -> torch.Tensor:
    """(heads, L, d) -> (L,): the length of each position's states over all heads."""
    return states.float().square().sum((0, 2)).sqrt()


def _distance(states: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Per position, the L2 distance over all heads between this request's states and an entry's (kept in its
    storage dtype). Relative distance rather than cosine decides what changed: a state that only grows or shrinks
    changes how sharp attention is."""
    return _norms(states.float() - stored.to(device=states.device, dtype=torch.float32))


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


def _dispatches_attention(module: nn.Module) -> bool:
    """True for modules whose forward calls the function transformers' ``AttentionInterface`` selects."""
    cls = type(module)
    if cls not in _DISPATCHES:
        try:
            _DISPATCHES[cls] = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _DISPATCHES[cls] = False
    return _DISPATCHES[cls]


def _attention_configs(model: nn.Module) -> list[Any]:
    """Every config whose ``_attn_implementation`` ``set_attn_implementation`` may change (sub-configs included)."""
    seen: dict[int, Any] = {}
    pending = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        pending += [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None)]
    return list(seen.values())


@register_strategy("attention")
class AttentionStrategy(Strategy):
    """Approximate: similar requests reuse earlier softmax attention maps and compute only ``A @ V`` (prefill)."""

    serves_attention_maps = True

    def __init__(self, controller):
        super().__init__(controller)
        self.max_error = self.config.attention_max_error
        self._pools: dict[tuple, torch.Tensor] = {}
        self._projections: dict[tuple, torch.Tensor] = {}
        self._heads: dict[str, int] = {}
        self._lock = threading.Lock()
        self.reuse = {"hits": 0, "recomputed": 0, "length": 0}
        """Counters of the rows and columns hits recomputed, for :attr:`recomputed_fraction`."""

    # --- wiring -----------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        model = self.controller.model
        modules = [self._attention_module(layer) for layer in self.layers]
        self.hooks.call(f"AttentionInterface[{ATTN_IMPLEMENTATION!r}]", _register_functions, _unregister_functions)
        for position, (layer, module) in enumerate(zip(self.layers, modules, strict=True)):
            bank = self.new_bank(
                layer.name, layer.device, n_banks=len(self.layers), key_dim=self.config.attention_key_dim
            )
            self._heads[layer.name] = _heads(module)
            cached = CachedAttention(self, layer, bank, self.config.threshold_for(position))
            self.hooks.set_attribute(module, _MODULE_ATTR, cached)
        for config in _attention_configs(model):  # what set_attn_implementation changes, restored on removal
            self.hooks.set_attribute(config, "_attn_implementation_internal", config._attn_implementation_internal)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def _attention_module(self, layer: CachedLayer) -> nn.Module:
        """The layer's self-attention: the first submodule dispatching through ``AttentionInterface`` (transformers
        layers run self-attention before cross-attention; later ones compute eagerly)."""
        model = self.controller.model
        can_set = getattr(model, "_can_set_attn_implementation", None)
        found = [m for m in layer.module.modules() if _dispatches_attention(m)]
        if not found or (can_set is not None and not can_set()):
            raise ValueError(
                f"strategy='attention' replaces the attention function through transformers' AttentionInterface, "
                f"but layer {layer.name!r} of {type(model).__name__} has no attention module that dispatches through "
                "it. Allowed: models whose attention calls ALL_ATTENTION_FUNCTIONS (BERT, RoBERTa, DistilBERT, GPT-2, "
                "Llama, Qwen2, Gemma3, ...); use strategy='exact' or 'semantic' for this one."
            )
        return found[0]

    def patterns(self, scope: RequestScope, keep: torch.Tensor) -> list[_Pattern]:
        """Per batch row, the :class:`_Pattern` of ``keep`` (batch, 1, L, L), cached for the request: the model
        passes the same mask tensor to every layer."""
        cache = scope.state.setdefault(_PATTERNS, {})
        signature = (keep.data_ptr(), tuple(keep.shape), keep.stride())
        if signature not in cache:
            cache[signature] = [_Pattern.of(keep[b, 0]) for b in range(keep.shape[0])]
        return cache[signature]

    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:
        config = getattr(self.controller.model, "config", None)
        scope.state[_PREFILL] = past_length(find_cache(arguments)) == 0
        scope.state[_WEIGHTS] = bool(arguments.get("output_attentions", getattr(config, "output_attentions", False)))
        scope.state[_NAMESPACE] = torch.tensor([namespace_tag(scope.namespace)], dtype=torch.long)

    # --- keys -------------------------------------------------------------------------------------------------------
    def lookup_keys(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """(batch, attention_key_dim) float32 keys: query and key states mean-pooled over position segments, then
        projected by a fixed-seed Gaussian matrix (the same in every process, so saved keys stay valid)."""
        length = query.shape[-2]
        pool = self._pool(length, query.device, query.dtype)
        pooled = torch.cat([torch.matmul(pool, query), torch.matmul(pool, key)], dim=1).flatten(1)
        return torch.matmul(pooled, self._projection(pooled.shape[1], query.device, query.dtype)).float()

    def _pool(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(segments, length) matrix averaging contiguous runs of positions."""
        cache_key = (length, device, dtype)
        if cache_key not in self._pools:
            segments = min(self.config.attention_key_segments, length)
            owner = torch.arange(length) * segments // length
            pool = nn.functional.one_hot(owner, segments).T.to(torch.float32)
            self._pools[cache_key] = (pool / pool.sum(-1, keepdim=True)).to(device=device, dtype=dtype)
        return self._pools[cache_key]

    def _projection(self, in_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        cache_key = (in_dim, device, dtype)
        if cache_key not in self._projections:
            generator = torch.Generator().manual_seed(_PROJECTION_SEED)
            matrix = torch.randn(in_dim, self.config.attention_key_dim, generator=generator)
            self._projections[cache_key] = (matrix / in_dim**0.5).to(device=device, dtype=dtype)
        return self._projections[cache_key]

    def verify_rows(self, candidates: torch.Tensor) -> torch.Tensor | None:
        """Up to ``attention_verify_rows`` evenly spaced positions of ``candidates`` (the last included), recomputed
        to check a hit; ``None`` when verification is off or there is nothing to check."""
        count = min(self.config.attention_verify_rows, candidates.numel())
        if count == 0:
            return None
        picks = torch.linspace(candidates.numel() - 1, 0, count, device=candidates.device).round().long()
        return candidates[picks.flip(0)]

    def count_reuse(self, recomputed: int, length: int) -> None:
        """Record one hit that recomputed ``recomputed`` of ``length`` rows and columns."""
        with self._lock:
            self.reuse["hits"] += 1
            self.reuse["recomputed"] += recomputed
            self.reuse["length"] += length

    @property
    def recomputed_fraction(self) -> float:
        """Mean fraction of rows and columns hits recomputed (0: every hit reused its whole map)."""
        return self.reuse["recomputed"] / self.reuse["length"] if self.reuse["length"] else 0.0

    # --- persistence ------------------------------------------------------------------------------------------------
    def check_state(self, bank_name: str, state: dict[str, torch.Tensor]) -> None:
        super().check_state(bank_name, state)
        heads = self._heads.get(bank_name)
        entries: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in state.items():
            if name.startswith("entry."):
                _, entry_id, field = name.split(".", 2)
                entries.setdefault(entry_id, {})[field] = tensor
        for entry_id, values in entries.items():
            _check_entry(f"entry {entry_id}", values, heads)


def _heads(module: nn.Module) -> int:
    config = getattr(module, "config", None)
    for source, name in ((module, "num_heads"), (module, "num_attention_heads"), (config, "num_attention_heads")):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
    return 0


def _check_entry(where: str, values: dict[str, torch.Tensor], heads: int | None) -> None:
    """Refuse an entry read from disk unless its tensors have the shapes and dtypes the cached path reads."""
    stored = values.get("map")
    if stored is None or stored.dim() != 3 or not stored.is_floating_point() or stored.shape[1] != stored.shape[2]:
        raise ValueError(f"{where}: 'map' must be a floating (heads, L, L) tensor.")
    if heads and stored.shape[0] != heads:
        raise ValueError(f"{where}: 'map' has {stored.shape[0]} heads; this layer has {heads}.")
    length = stored.shape[1]
    expected = {
        "lse": (torch.int32, (stored.shape[0], length)),
        "mask": (torch.bool, (length, length)),
        "namespace": (torch.long, (1,)),
    }
    for name, (dtype, shape) in expected.items():
        tensor = values.get(name)
        if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{where}: {name!r} must be a {dtype} tensor of shape {shape}.")
    for name in ("query", "key"):
        tensor = values.get(name)
        if tensor is None or tensor.dim() != 3 or not tensor.is_floating_point() or tensor.shape[1] != length:
            raise ValueError(f"{where}: {name!r} must be a floating (heads, {length}, head_dim) tensor.")
