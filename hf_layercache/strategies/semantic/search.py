"""Search: the usable entry nearest to each row in a layer's bank, and which found rows are served or verified."""

from __future__ import annotations

from typing import Any

import torch

from ...bank import CacheBank
from ...config import LayerCacheConfig
from ...fingerprints import Fingerprint
from ...layers import rows_splittable
from ...verified import ErrorBound
from .alignment import ADDED, Index, align_tokens, with_neighbours
from .entries import SemanticEntry
from .run import Candidate, LayerSlot, SemanticRun

_CANDIDATES = 4
"""Nearest entries of the row's tenant examined per row: the best may fail to align."""
SIMILARITY_TOLERANCE = 1e-6
"""Float slack on similarity comparisons, so an identical input still hits at threshold 1.0."""
RECOMPUTED_NEIGHBOURS = 1
"""A partial hit also computes the entry's tokens this close to its additions (CacheBlend recomputes the tokens
whose states an edit moves most; these are they: on campaign edits of MiniLM, entry tokens next to an addition moved
0.05 in cosine, ones six or more away 0.008-0.015, and an appended reference moved the ``[SEP]`` after it 0.06).
Interleaved on the campaign stream of docs/benchmarks.md, at 0 / 1 / 2 / 4: 1st-percentile cosine 0.9517 / 0.9569 /
0.9596 / 0.9603, rows under 0.95 9 / 6 / 6 / 5, speed 3.40x / 3.41x / 3.31x / 3.27x of plain (another run, 0 / 1:
3.59x / 3.48x): a third fewer rows under 0.95 for up to 3% of the speed."""


class EntrySearch:
    """Finds each row's candidate entry in a layer's bank and draws which candidates are verified.

    It reads ``config`` (thresholds, ``max_unaligned``, ``verify_fraction``) at every call, as a change to the
    model's config takes effect at once. One seeded generator draws for every layer and request, so runs repeat.
    """

    def __init__(
        self,
        banks: dict[str, CacheBank],
        config: LayerCacheConfig,
        fingerprint: Fingerprint,
        error_bound: ErrorBound | None,
        default_verify_fraction: float,
    ):
        self.banks = banks
        """The strategy's banks by layer name, filled as it attaches."""
        self.config = config
        self.fingerprint = fingerprint
        self.error_bound = error_bound
        self.default_verify_fraction = default_verify_fraction
        self._draws = torch.Generator().manual_seed(0)

    @property
    def verify_fraction(self) -> float:
        """The share of hits verified: the config's, or the strategy's default when it says ``None``."""
        configured = self.config.verify_fraction
        return self.default_verify_fraction if configured is None else float(configured)

    def find(
        self, slot: LayerSlot, run: SemanticRun, keys: torch.Tensor, rows: list[int], kind: str
    ) -> tuple[dict[int, Candidate], dict[int, float]]:
        """The best usable entry of ``slot``'s bank for each of ``rows`` at or above its threshold, and each row's
        best similarity in the bank. A whole hit's similarity is the fingerprint's between the two inputs; a partial
        hit's is the share of the entry the row holds (:meth:`~hf_layercache.fingerprints.Fingerprint.contained`),
        since the row computes what it adds."""
        bank = self.banks[slot.layer.name]
        own = bank.count(run.namespace)  # sized by the tenant's entries: the search is the same whoever else stored
        rows = [row for row in rows if run.at_start[row]]
        if not rows or own == 0:
            return {}, {}
        threshold = self.config.threshold_for(slot.rank)
        floor = self.floor(run, threshold)
        scores, ids = bank.search(keys[rows].to(bank.device), min(_CANDIDATES, own), namespace=run.namespace)
        found, best = {}, {}
        for row, row_scores, row_ids in zip(rows, scores.tolist(), ids.tolist(), strict=True):
            best[row] = row_scores[0]
            for score, entry_id in zip(row_scores, row_ids, strict=True):
                if entry_id < 0 or score < floor - SIMILARITY_TOLERANCE:
                    break
                entry = bank.get(entry_id, run.namespace)
                if entry is None:
                    continue
                candidate = self._candidate(slot, run, row, (entry_id, entry), kind, threshold, score)
                if candidate is not None:
                    found[row] = candidate
                    break
        return found, best

    def floor(self, run: SemanticRun, threshold: float) -> float:
        """The lowest key similarity at which an entry can still be a hit at ``threshold``: below it when partial
        hits may serve a row that adds up to ``max_added`` of its tokens to the entry."""
        if not run.partial or self.config.edits != "additive" or self.config.max_added <= 0:
            return threshold
        growth = 1.0 / max(1.0 - self.config.max_added, 1e-6)
        return min(threshold, self.fingerprint.containment_floor(threshold, growth))

    def _candidate(
        self,
        slot: LayerSlot,
        run: SemanticRun,
        row: int,
        found: tuple[int, SemanticEntry],
        kind: str,
        threshold: float,
        estimate: float,
    ) -> Candidate | None:
        """How the ``found`` entry (id and entry) serves ``row``, or ``None`` when it must not."""
        entry_id, entry = found
        partial = self._partial_entry(slot, run, entry)
        contained = None
        if estimate < threshold - SIMILARITY_TOLERANCE:
            contained = self._similarity(run, row, entry, estimate, True) if partial else None
            if contained is None or contained < threshold - SIMILARITY_TOLERANCE:
                return None  # below the threshold as a whole, and not holding enough of the entry to serve it in part
        index = self._usable(run, row, entry, kind, threshold, partial)
        if index is None or (slot.causal and not isinstance(index, slice)):
            return None  # a causal layer's added token (where a decoder predicts from) has no state to borrow
        added = self._added(run, row, index, partial)
        if added is False:
            return None
        if added is not None and contained is not None:
            score = contained
        else:
            score = self._similarity(run, row, entry, estimate, added is not None)
        if score < threshold - SIMILARITY_TOLERANCE:
            return None
        if added is None:
            return Candidate(entry_id, slot.layer.name, entry, index, score)
        computed = with_neighbours(added, run.lengths[row], RECOMPUTED_NEIGHBOURS)
        in_entry = index[computed]  # the entry's position of each computed token, ADDED for the added ones
        replaced = in_entry[in_entry != ADDED]
        return Candidate(entry_id, slot.layer.name, entry, index, score, computed=computed, replaced=replaced)

    def _partial_entry(self, slot: LayerSlot, run: SemanticRun, entry: SemanticEntry) -> bool:
        """Whether the entry can serve a row in part in this run: it holds its K/V in every looked-up layer up to
        ``slot`` (an entry from disk may come from another fingerprint, with another first looked-up layer)."""
        kv = entry.attention_kv
        layers = slot.position - self.fingerprint.after_layers + 1
        return run.partial and self.config.edits == "additive" and kv is not None and kv.shape[0] == layers

    def _added(self, run: SemanticRun, row: int, index: Index, partial: bool) -> torch.Tensor | bool | None:
        """The positions of the row's added tokens when it is served in part, ``None`` when it is served whole, or
        ``False`` when it adds more than either way allows (``max_added``, ``max_unaligned``)."""
        if isinstance(index, slice):
            return None
        added = (index == ADDED).nonzero().squeeze(1)
        share = added.numel() / max(run.lengths[row], 1)
        if not added.numel():
            return None
        if partial and share <= self.config.max_added:
            return added
        return None if share <= self.config.max_unaligned else False

    def _similarity(self, run: SemanticRun, row: int, entry: SemanticEntry, estimate: float, partial: bool) -> float:
        """The fingerprint's exact similarity for the pair when it has one (MinHash: the Jaccard similarity of the
        token shingles, or for a partial hit the share of the entry's shingles in the row), else the key's."""
        tokens = run.tokens[row]
        if tokens is None or entry.tokens.numel() == 0:
            return estimate
        old = entry.tokens.tolist()
        exact = self.fingerprint.contained(tokens, old) if partial else self.fingerprint.confirm(tokens, old)
        return estimate if exact is None else exact

    def _usable(
        self, run: SemanticRun, row: int, entry: SemanticEntry, kind: str, threshold: float, partial: bool
    ) -> Index | None:
        """How the entry's tokens map onto the row's, or ``None`` when it must not be served to this row. With
        ``partial``, added tokens up to ``max_added`` are allowed: the row computes them (see :meth:`_added`)."""
        if entry.kind != kind or (run.with_kv and not entry.kv_recorded):
            return None
        tokens, old = run.tokens[row], entry.tokens
        if threshold >= 1.0 and (tokens is None or tokens != old.tolist()):
            return None  # threshold 1.0: identical inputs only
        if tokens is None or old.numel() == 0:  # nothing to align by
            return slice(None) if entry.value.shape[0] == run.lengths[row] else None
        if run.with_kv:  # K/V need equal lengths; an additive edit of equal length is no edit
            same = len(tokens) == old.numel() and (self.config.edits == "any" or tokens == old.tolist())
            return slice(None) if same else None
        config = self.config
        bound = max(config.max_unaligned, config.max_added) if partial else config.max_unaligned
        cache_key = (row, old.numpy().tobytes(), bound)
        if cache_key not in run.alignments:
            run.alignments[cache_key] = align_tokens(tokens, old.tolist(), bound, config.edits)
        return run.alignments[cache_key]

    def choose(
        self, slot: LayerSlot, run: SemanticRun, arguments: dict[str, Any], candidates: dict[int, Candidate]
    ) -> dict[int, Candidate]:
        """Drop partial hits a KV cache or unsplittable arguments cannot take, and draw the rows to verify."""
        partial = 0 < len(candidates) < run.batch
        if partial and (run.with_kv or not rows_splittable(arguments, slot.layer.spec, run.batch)):
            return {}
        fraction = self.verify_fraction
        for row, candidate in candidates.items():
            if self.error_bound is not None and not self._reproduces(run, row, candidate):
                tau = self.error_bound.exploration_probability(
                    candidate.bank, candidate.entry_id, candidate.entry.observations, candidate.score
                )
                candidate.explore = self._draw() < tau
            candidate.audit = not candidate.explore and fraction > 0 and self._draw() < fraction
        if run.with_kv and any(c.verify for c in candidates.values()):
            for candidate in candidates.values():  # a KV cache computes the whole batch or none of it
                candidate.audit = not candidate.explore
        return candidates

    @staticmethod
    def _reproduces(run: SemanticRun, row: int, candidate: Candidate) -> bool:
        """Whether serving the candidate gives what the layer would compute: an entry of the row's own tokens (same
        digest, so same namespace) while the row's state is still exact. ``max_error_rate`` serves it unexplored:
        there is no error to bound, and exploring it would spend a full computation to learn nothing."""
        return run.exact[row] and candidate.entry.source == run.digests[row]

    def _draw(self) -> float:
        return float(torch.rand(1, generator=self._draws))
