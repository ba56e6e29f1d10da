"""Least recently used."""

from __future__ import annotations

from collections import OrderedDict

from ..registry import register_policy
from .base import Policy


@register_policy("lru")
class LRUPolicy(Policy):
    """Evict the entry served or stored longest ago. The default: cheap and right for repeating traffic."""

    def __init__(self) -> None:
        super().__init__()
        self._order: OrderedDict[int, None] = OrderedDict()

    def _track(self, entry_id: int, cost: float) -> None:
        self._order[entry_id] = None
        self._order.move_to_end(entry_id)

    def _untrack(self, entry_id: int) -> None:
        self._order.pop(entry_id, None)

    def on_hit(self, entry_id: int, similarity: float = 1.0) -> None:
        if entry_id in self._order:
            self._order.move_to_end(entry_id)

    def eviction_order(self):
        return iter(list(self._order))
