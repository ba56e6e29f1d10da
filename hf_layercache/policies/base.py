"""The eviction-policy contract: bookkeeping that decides which entries a full bank drops first.

A policy never holds tensors of values; it sees entry ids, their sizes and events. The bank calls:

* ``on_insert(id, nbytes, cost)`` when an entry is stored (``cost``: seconds of compute a hit saves),
* ``on_hit(id, similarity)`` when an entry is served, ``on_miss()`` when a lookup finds nothing usable,
* ``on_error(id, error)`` when a verified reuse measured ``error`` (relative error, 0 is perfect),
* ``on_remove(id)`` when an entry leaves the bank for any reason,
* ``victims(nbytes_needed)`` to learn what to drop, and ``state_dict()`` / ``load_state_dict()`` to persist.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Policy(ABC):
    """Base class: keeps each entry's size so :meth:`victims` can stop once enough bytes are freed."""

    def __init__(self) -> None:
        self._nbytes: dict[int, int] = {}

    def on_insert(self, entry_id: int, nbytes: int, cost: float = 0.0) -> None:
        self._nbytes[entry_id] = int(nbytes)
        self._track(entry_id, cost)

    def on_hit(self, entry_id: int, similarity: float = 1.0) -> None:  # noqa: B027 - optional hook
        """Called when ``entry_id`` is served."""

    def on_miss(self) -> None:  # noqa: B027 - optional hook
        """Called when a lookup served nothing."""

    def on_error(self, entry_id: int, error: float) -> None:  # noqa: B027 - optional hook
        """Called with the relative error measured when a hit was verified against real compute."""

    def on_remove(self, entry_id: int) -> None:
        self._nbytes.pop(entry_id, None)
        self._untrack(entry_id)

    def victims(self, nbytes_needed: int) -> list[int]:
        """Ids to drop, in order, until at least ``nbytes_needed`` bytes are freed (at least one id if any)."""
        out, freed = [], 0
        for entry_id in self.eviction_order():
            out.append(entry_id)
            freed += self._nbytes.get(entry_id, 0)
            if freed >= nbytes_needed:
                break
        return out

    def __len__(self) -> int:
        return len(self._nbytes)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._nbytes

    @abstractmethod
    def _track(self, entry_id: int, cost: float) -> None:
        """Start tracking a new (or re-inserted) entry."""

    @abstractmethod
    def _untrack(self, entry_id: int) -> None:
        """Stop tracking an entry."""

    @abstractmethod
    def eviction_order(self):
        """Iterate over tracked ids, the first to evict first."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that restore the policy's bookkeeping. The base class stores ids and sizes in eviction order."""
        order = list(self.eviction_order())
        return {
            "ids": torch.tensor(order, dtype=torch.long),
            "nbytes": torch.tensor([self._nbytes[i] for i in order], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Rebuild from :meth:`state_dict`; re-inserting in eviction order restores order-based policies."""
        for entry_id in list(self._nbytes):
            self.on_remove(entry_id)
        for entry_id, nbytes in zip(state["ids"].tolist(), state["nbytes"].tolist(), strict=True):
            self.on_insert(int(entry_id), int(nbytes))
