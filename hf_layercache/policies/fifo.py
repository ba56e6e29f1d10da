"""First in, first out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from ..registry import register_policy
from .base import Policy


@register_policy("fifo")
class FIFOPolicy(Policy):
    """Evict the entry stored longest ago, whatever its hits.

    Hits change nothing, so serving an entry never writes to the policy: the cheapest policy, and a fair baseline
    for traffic without reuse structure. Re-inserting an id stores it anew, at the back of the queue.
    """

    promotes_on_hit = False

    def __init__(self) -> None:
        super().__init__()
        self._queue: OrderedDict[int, None] = OrderedDict()

    def _track(self, entry_id: int, cost: float) -> None:
        self._queue[entry_id] = None

    def _untrack(self, entry_id: int) -> None:
        del self._queue[entry_id]

    def eviction_order(self) -> Iterator[int]:
        return iter(self._queue)
