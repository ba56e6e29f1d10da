"""Least frequently used."""

from __future__ import annotations

from ..registry import register_policy
from .base import ScoredPolicy


@register_policy("lfu")
class LFUPolicy(ScoredPolicy):
    """Evict the entry served the fewest times since it was stored; ties go to the least recently used.

    Best when popularity is stable: a burst of one-off requests cannot flush entries that keep being reused, as it
    does under LRU. The price is slow adaptation: counts never decay, so a formerly popular entry outlives its
    popularity. Use ``staleness`` when the popular set drifts. Counts start at 1 on insert and are forgotten when
    an entry leaves the bank.
    """

    def _track(self, entry_id: int, cost: float) -> None:
        self._score(entry_id, 1.0)

    def on_hit(self, entry_id: int, similarity: float = 1.0) -> None:
        if entry_id in self._items:
            self._score(entry_id, self._current(entry_id) + 1.0)
