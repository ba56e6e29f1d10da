"""How much of the stored maps the attention strategy's hits reused, over every cached layer of a model."""

from __future__ import annotations

import threading

import torch


class ReuseCounters:
    """Counters of the rows and columns hits recomputed (:attr:`recomputed_fraction`), of the reused rows whose
    stored output they corrected (``corrected``), of the heads they computed exactly because their maps moved (failed
    verification), and of the rows served by an identical row of their batch (``duplicates``).

    Kept beside ``stats()`` rather than in it: they describe how well hits reuse a map, which tells how to set
    ``attention_position_tolerance`` and ``attention_max_error``. One instance is shared by every layer's engine
    (each counts its own hits); the strategy reads and resets it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Start from zero (``clear()``: the counts described the entries that went). A new dict: one read before
        keeps the counts it had."""
        self.counts = {
            "hits": 0,
            "recomputed": 0,
            "length": 0,
            "heads_recomputed": 0,
            "heads": 0,
            "duplicates": 0,
            "corrected": 0,
        }

    def count(self, recomputed: int, length: int, heads: torch.Tensor | None, n_heads: int, corrected: int) -> None:
        """Record one hit that recomputed ``recomputed`` of ``length`` rows and columns, and ``heads`` of
        ``n_heads`` heads (``None``: none), and corrected the stored output of ``corrected`` rows (the reused rows
        that attend a changed column: a causal hit whose changes sit in the tail corrects none before them)."""
        with self._lock:
            self.counts["corrected"] += corrected
            self.counts["hits"] += 1
            self.counts["recomputed"] += recomputed
            self.counts["length"] += length
            self.counts["heads_recomputed"] += 0 if heads is None else len(heads)
            self.counts["heads"] += n_heads

    def count_duplicates(self, rows: int) -> None:
        """Record ``rows`` rows served by an identical row of the same batch (looked up and computed once)."""
        if rows:
            with self._lock:
                self.counts["duplicates"] += rows

    @property
    def recomputed_fraction(self) -> float:
        """Mean fraction of rows and columns hits recomputed (0: every hit reused its whole map)."""
        return self.counts["recomputed"] / self.counts["length"] if self.counts["length"] else 0.0
