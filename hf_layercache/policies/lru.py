"""Least recently used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from ..registry import register_policy
from .base import Policy


@register_policy("lru")
class LRUPolicy(Policy):
    """Evict the entry served or stored longest ago. The default: cheap and right for repeating traffic.

    An ordered dict keeps ids from least to most recently used, so every event and each victim is O(1).
    """

    def __init__(self) -> None:
        super().__init__()
        self._order: OrderedDict[int, None] = OrderedDict()

    def _track(self, entry_id: int, cost: float) -> None:
        self._order[entry_id] = None

    def _untrack(self, entry_id: int) -> None:
        del self._order[entry_id]

    def on_hit(self, entry_id: int, similarity: float = 1.0) -> None:
        if entry_id in self._order:
            self._order.move_to_end(entry_id)

    def eviction_order(self) -> Iterator[int]:
        return iter(self._order)
