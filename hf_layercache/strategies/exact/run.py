"""What one forward pass knows about one layer stack under the exact strategy."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...kv import KVWrite
from .digests import RowKey
from .entry import ExactEntry


@dataclass
class StackRun:
    """What one forward pass knows about one layer stack: which rows hit and what the missed rows produced."""

    digests: list[bytes]
    keys: list[RowKey]
    hits: dict[int, ExactEntry]
    misses: list[int]
    split: bool
    with_kv: bool
    namespace: int
    writes: dict[int, list[KVWrite]] = field(default_factory=dict)
    seconds_per_row: float = 0.0
    audits: dict[int, tuple[int, ExactEntry]] = field(default_factory=dict)
    """Rows that hit but are computed anyway (``verify_fraction``), with the entry the computed output must match."""
    twins: dict[int, int] = field(default_factory=dict)
    """Missed rows that repeat an earlier missed row of the batch (same digest and layout), by that row: computed
    once, the twin's output copied at the last layer."""

    @property
    def batch(self) -> int:
        return len(self.digests)
