"""GreedyDual-Size-Frequency: keep what saves the most compute per byte."""

from __future__ import annotations

import torch

from ..registry import register_policy
from .base import ScoredPolicy, check_number


@register_policy("cost")
class CostPolicy(ScoredPolicy):
    """GreedyDual-Size-Frequency (Cherkasova 1998) with the compute a hit saves as the cost.

    Each entry has a value ``H = L + frequency * cost / size``: ``cost`` is the seconds of compute one hit saves,
    ``size`` its bytes and ``frequency`` its hits since it was stored (1 on insert). The lowest ``H`` goes first.
    So under a byte budget a large entry must save proportionally more compute, or be used more, to stay.

    ``L`` is the inflation value: when an entry is evicted, ``L`` rises to its ``H``. Entries stored or hit later
    start from the higher ``L``, so an entry that stops being used is eventually overtaken by fresh ones however
    high its frequency was: GDSF ages out old popularity, which plain LFU never does. Only evictions raise ``L``
    (ids returned by the latest :meth:`victims` call and then removed); removing an entry for another reason
    does not age the rest.

    A cost of 0 means "not measured" and counts as ``default_cost``, so without timings the policy still weighs
    frequency and size. Mixing measured and unmeasured costs in one bank skews the order; measure all or none.
    """

    def __init__(self, default_cost: float = 1.0) -> None:
        super().__init__()
        self.default_cost = check_number(type(self).__name__, "default_cost", default_cost, 0.0, closed=False)
        self._inflation = 0.0
        self._costs: dict[int, float] = {}
        self._frequency: dict[int, int] = {}
        self._proposed: set[int] = set()

    @property
    def inflation(self) -> float:
        """``L``: the ``H`` of the latest eviction, the floor every new value starts from."""
        return self._inflation

    def _track(self, entry_id: int, cost: float) -> None:
        self._costs[entry_id] = cost or self.default_cost
        self._frequency[entry_id] = 1
        self._score(entry_id, self._value(entry_id))

    def _untrack(self, entry_id: int) -> None:
        super()._untrack(entry_id)
        del self._costs[entry_id], self._frequency[entry_id]

    def _value(self, entry_id: int) -> float:
        size = max(self._nbytes[entry_id], 1)
        return self._inflation + self._frequency[entry_id] * self._costs[entry_id] / size

    def on_hit(self, entry_id: int, similarity: float = 1.0) -> None:
        if entry_id in self._items:
            self._frequency[entry_id] += 1
            self._score(entry_id, self._value(entry_id))

    def victims(self, nbytes_needed: int) -> list[int]:
        out = super().victims(nbytes_needed)
        self._proposed = set(out)
        return out

    def on_remove(self, entry_id: int) -> None:
        if entry_id in self._proposed and entry_id in self._items:
            self._inflation = max(self._inflation, self._current(entry_id))
            self._proposed.discard(entry_id)
        super().on_remove(entry_id)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        ids = state["ids"].tolist()
        return {
            **state,
            "costs": torch.tensor([self._costs[i] for i in ids], dtype=torch.float64),
            "frequency": torch.tensor([self._frequency[i] for i in ids], dtype=torch.long),
            "inflation": torch.tensor(self._inflation, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ids = self._column(state, "ids").tolist()
        costs = self._column(state, "costs", len(ids)).tolist()
        frequency = self._column(state, "frequency", len(ids)).tolist()
        inflation = self._scalar(state, "inflation")
        if any(not c > 0 for c in costs) or any(f < 1 for f in frequency):
            raise ValueError("CostPolicy state: 'costs' must be > 0 and 'frequency' >= 1.")
        super().load_state_dict(state)
        self._costs = dict(zip(ids, costs, strict=True))
        self._frequency = {i: int(f) for i, f in zip(ids, frequency, strict=True)}
        self._inflation = inflation
        self._proposed = set()
