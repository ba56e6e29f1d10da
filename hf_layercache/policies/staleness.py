"""Exponentially decayed match rate: stale entries go first."""

from __future__ import annotations

import math

import torch

from ..registry import register_policy
from .base import ScoredPolicy, check_number


@register_policy("staleness")
class StalenessPolicy(ScoredPolicy):
    """Evict the entry with the lowest exponentially decayed match rate (LLMCache's staleness; LRFU in the
    caching literature).

    Time is a logical clock that counts lookups: each ``on_hit`` or ``on_miss`` call is one tick, inserts and
    removals are not. A wall clock would make eviction depend on machine speed and pauses; lookups are what make
    an entry go stale, and counting them keeps the policy deterministic and testable. An entry's match rate is the
    EWMA, over lookups, of "this lookup matched the entry", with weight halving every ``half_life`` lookups;
    storing an entry counts as its first match, so a new entry ranks like one just served.

    ``half_life`` spans the two classic policies: a small one forgets at once and behaves like LRU, a huge one
    never forgets and behaves like LFU. It pays when popularity lasts longer than a few half-lives; about twice the
    bank's entry count is a good start (the default, 4000 lookups, suits banks of about 2000 entries). See
    docs/policies.md for measurements.

    All rates decay by the same factor per tick, so their order only changes on hits. The heap therefore keeps
    ``log2`` of each entry's undecayed sum ``sum(2 ** (t_match / half_life))``, which never needs rescoring.
    """

    def __init__(self, half_life: float = 4000.0) -> None:
        super().__init__()
        self.half_life = check_number(type(self).__name__, "half_life", half_life, 0.0, closed=False)
        self._clock = 0

    def _track(self, entry_id: int, cost: float) -> None:
        self._score(entry_id, self._clock / self.half_life)

    def on_hit(self, entry_id: int, similarity: float = 1.0) -> None:
        self._clock += 1
        if entry_id in self._items:
            self._score(entry_id, _log2_add(self._current(entry_id), self._clock / self.half_life))

    def on_miss(self) -> None:
        self._clock += 1

    def match_rate(self, entry_id: int) -> float:
        """The entry's decayed match rate now: matches per lookup over roughly the last ``half_life`` lookups."""
        decayed_matches = 2.0 ** (self._current(entry_id) - self._clock / self.half_life)
        return decayed_matches * (1.0 - 2.0 ** (-1.0 / self.half_life))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **super().state_dict(),
            "clock": torch.tensor(self._clock, dtype=torch.long),
            "half_life": torch.tensor(self.half_life, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore rates and clock. A state saved with another ``half_life`` keeps each entry's current decayed
        matches, which then decay at this policy's ``half_life``."""
        clock, saved_half_life = int(self._scalar(state, "clock")), self._scalar(state, "half_life")
        if clock < 0 or saved_half_life <= 0:
            raise ValueError(f"StalenessPolicy state: impossible clock {clock} or half_life {saved_half_life}.")
        super().load_state_dict(state)
        self._clock = clock
        if saved_half_life != self.half_life:
            shift = clock / self.half_life - clock / saved_half_life
            for entry_id in list(self._items):
                self._score(entry_id, self._current(entry_id) + shift, touch=False)


def _log2_add(a: float, b: float) -> float:
    """``log2(2**a + 2**b)`` without overflow."""
    high, low = max(a, b), min(a, b)
    return high + math.log2(1.0 + 2.0 ** (low - high))
