"""Search: the usable entry nearest to each row in a layer's bank, and which found rows are served or verified."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...bank import CacheBank
from ...layers import rows_splittable
from ...verified import ErrorBound
from .alignment import align_tokens
from .entries import _KV_RECORDED, _NAMESPACE
from .run import Candidate, SemanticRun

if TYPE_CHECKING:
    from ...config import LayerCacheConfig
    from .hook import SemanticLayerHook

_CANDIDATES = 4
"""Nearest entries examined per row: the best may belong to another namespace or fail to align."""
_TOLERANCE = 1e-6
"""Float slack on similarity comparisons, so an identical input still hits at threshold 1.0."""


class EntrySearch:
    """The part of :class:`~.strategy.SemanticStrategy` that finds candidates and draws the rows to verify.

    A mixin: the strategy sets these attributes in ``__init__``.
    """

    config: LayerCacheConfig
    banks: dict[str, CacheBank]
    error_bound: ErrorBound | None
    _draws: torch.Generator

    # --- finding entries ------------------------------------------------------------------------------------------
    def find(
        self, hook: SemanticLayerHook, run: SemanticRun, keys: torch.Tensor, rows: list[int], stored: str
    ) -> tuple[dict[int, Candidate], dict[int, float]]:
        """The best usable entry of ``hook``'s bank for each of ``rows`` at or above its threshold, and each row's
        best similarity in the bank."""
        bank = self.banks[hook.layer.name]
        if not rows or len(bank) == 0:
            return {}, {}
        threshold = self.config.threshold_for(hook.rank)
        scores, ids = bank.search(keys[rows].to(bank.device), min(_CANDIDATES, len(bank)))
        found, best = {}, {}
        for row, row_scores, row_ids in zip(rows, scores.tolist(), ids.tolist(), strict=True):
            best[row] = row_scores[0]
            for score, entry_id in zip(row_scores, row_ids, strict=True):
                if entry_id < 0 or score < threshold - _TOLERANCE:
                    break
                values = bank.get(entry_id)
                index = self._usable(run, row, values, stored, threshold) if values is not None else None
                if index is not None:
                    found[row] = Candidate(entry_id, hook.layer.name, values, index, score)
                    break
        return found, best

    def _usable(
        self, run: SemanticRun, row: int, values: dict[str, torch.Tensor], stored: str, threshold: float
    ) -> torch.Tensor | None:
        """How the entry's tokens map onto the row's, or ``None`` when it must not be served to this row."""
        meta = values.get("meta")
        if meta is None or int(meta[_NAMESPACE]) != run.namespace or stored not in values:
            return None
        if run.with_kv and not bool(meta[_KV_RECORDED]):
            return None
        tokens, old = run.tokens[row], values["tokens"]
        if threshold >= 1.0 and (tokens is None or tokens != old.tolist()):
            return None  # threshold 1.0: identical inputs only
        if tokens is None or old.numel() == 0 or run.with_kv:  # nothing to align by, or K/V need equal lengths
            return slice(None) if values[stored].shape[0] == run.lengths[row] else None
        cache_key = (row, old.numpy().tobytes())
        if cache_key not in run.alignments:
            run.alignments[cache_key] = align_tokens(tokens, old.tolist(), self.config.max_unaligned)
        return run.alignments[cache_key]

    def _choose(
        self, hook: SemanticLayerHook, run: SemanticRun, arguments: dict[str, Any], candidates: dict[int, Candidate]
    ) -> dict[int, Candidate]:
        """Drop partial hits a KV cache or unsplittable arguments cannot take, and draw the rows to verify."""
        partial = 0 < len(candidates) < run.batch
        if partial and (run.with_kv or not rows_splittable(arguments, hook.layer.spec, run.batch)):
            return {}
        fraction = self.config.verify_fraction
        for candidate in candidates.values():
            if self.error_bound is not None:
                tau = self.error_bound.exploration_probability(
                    candidate.bank, candidate.entry_id, candidate.values, candidate.score
                )
                candidate.explore = self._draw() < tau
            candidate.audit = not candidate.explore and fraction > 0 and self._draw() < fraction
        if run.with_kv and any(c.verify for c in candidates.values()):
            for candidate in candidates.values():  # a KV cache computes the whole batch or none of it
                candidate.audit = not candidate.explore
        return candidates

    def _draw(self) -> float:
        return float(torch.rand(1, generator=self._draws))

    def _record_lookups(self, hook: SemanticLayerHook, run: SemanticRun, candidates: dict[int, Candidate]) -> None:
        bank = self.banks[hook.layer.name]
        for row in range(run.batch):
            if row in candidates:
                bank.record_hit(candidates[row].entry_id, candidates[row].score)
            else:
                bank.record_miss()
