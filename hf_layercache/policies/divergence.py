"""Divergence monitoring: entries whose verified reuse error grows go first."""

from __future__ import annotations

import math

import torch

from ..registry import register_policy
from .base import ScoredPolicy, check_number


@register_policy("divergence")
class DivergencePolicy(ScoredPolicy):
    """Evict entries whose reuse has become inaccurate first, the worst first; then the least recently used.

    Approximate reuse serves an entry to inputs that are only similar to the one that made it. When the bank
    verifies a hit against real compute, it reports the relative error through ``on_error``; an entry whose error
    keeps growing is drifting away from the traffic it serves, and keeping it costs accuracy, not just memory.

    Errors aggregate as an exponentially weighted moving average: the first verification sets it, each later one
    moves it by ``alpha`` toward the new error, so a recent rise counts at once and one outlier does not condemn
    an entry for ever. An entry whose average is above ``tolerance`` is *diverging*: diverging entries are evicted
    before all others, the largest average first. Entries at or under ``tolerance`` and entries never verified
    yet are ranked by recency, as in LRU: verification is usually sampled, and an unverified entry was exact for
    the input that stored it, so no evidence is not bad evidence. Without any ``on_error`` calls this is LRU.
    """

    def __init__(self, alpha: float = 0.5, tolerance: float = 0.05) -> None:
        super().__init__()
        self.alpha = check_number(type(self).__name__, "alpha", alpha, 0.0, 1.0, closed=False)
        self.tolerance = check_number(type(self).__name__, "tolerance", tolerance, 0.0, closed=True)
        self._errors: dict[int, float] = {}

    def _track(self, entry_id: int, cost: float) -> None:
        self._score(entry_id, 0.0)

    def _untrack(self, entry_id: int) -> None:
        super()._untrack(entry_id)
        self._errors.pop(entry_id, None)

    def on_hit(self, entry_id: int, similarity: float = 1.0) -> None:
        if entry_id in self._items:
            self._score(entry_id, self._current(entry_id))

    def on_error(self, entry_id: int, error: float) -> None:
        if not isinstance(error, int | float) or not math.isfinite(error) or error < 0:
            raise ValueError(f"DivergencePolicy.on_error: error must be a finite relative error >= 0, got {error!r}.")
        if entry_id not in self._items:
            return
        previous = self._errors.get(entry_id)
        average = error if previous is None else previous + self.alpha * (error - previous)
        self._errors[entry_id] = average
        self._score(entry_id, -average if average > self.tolerance else 0.0, touch=False)

    def error(self, entry_id: int) -> float | None:
        """The entry's moving average of verified error, or ``None`` if it was never verified."""
        return self._errors.get(entry_id)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        errors = [self._errors.get(i, math.nan) for i in state["ids"].tolist()]
        return {**state, "errors": torch.tensor(errors, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averages (NaN marks an entry never verified) and recency; scores follow this ``tolerance``."""
        ids = self._column(state, "ids").tolist()
        errors = self._column(state, "errors", len(ids)).tolist()
        if any(e < 0 or math.isinf(e) for e in errors):
            raise ValueError("DivergencePolicy state: 'errors' must be >= 0 and finite, or NaN for unverified.")
        super().load_state_dict(state)
        self._errors = {i: e for i, e in zip(ids, errors, strict=True) if not math.isnan(e)}
        for entry_id, average in self._errors.items():
            self._score(entry_id, -average if average > self.tolerance else 0.0, touch=False)
