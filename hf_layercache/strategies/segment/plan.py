"""Which tokens of a prompt are reused, recomputed and computed: the plan of one row, before any model call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .entry import SegmentEntry
from .segments import Segment


@dataclass
class RowPlan:
    """One row's real tokens, its segments and what the bank holds of them."""

    tokens: torch.Tensor
    """(n,) the row's real tokens (CPU)."""
    segments: list[Segment]
    entries: dict[int, SegmentEntry] = field(default_factory=dict)
    """By segment index: the cached entry it reuses (held for this call even if the bank evicts it meanwhile)."""
    recompute: torch.Tensor | None = None
    """(n,) bool: reused tokens recomputed in this call (set by selection)."""

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reused_mask(self) -> torch.Tensor:
        """(n,) bool: tokens whose states come from the bank (before selection)."""
        mask = torch.zeros(self.length, dtype=torch.bool)
        for i in self.entries:
            mask[self.segments[i].start : self.segments[i].end] = True
        mask[-1] = False  # the last token is always computed: its output is what generation reads
        return mask

    def exact_mask(self) -> torch.Tensor:
        """(n,) bool: reused tokens whose stored states are exactly a full prefill's here: a segment at position 0
        stored from position 0 saw nothing but itself both times."""
        mask = torch.zeros(self.length, dtype=torch.bool)
        for i, entry in self.entries.items():
            segment = self.segments[i]
            if segment.start == 0 and int(entry.start) == 0:
                mask[segment.start : segment.end] = True
        return mask & self.reused_mask()

    def kept(self) -> torch.Tensor:
        """(n,) bool: tokens served from the bank in this call (reused and not recomputed)."""
        kept = self.reused_mask()
        return kept if self.recompute is None else kept & ~self.recompute
