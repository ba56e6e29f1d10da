"""The eviction-policy contract: bookkeeping that decides which entries a full bank drops first.

A policy never holds tensors of values; it sees entry ids, their sizes and events. The bank calls:

* ``on_insert(id, nbytes, cost)`` when an entry is stored (``cost``: seconds of compute a hit saves),
* ``on_hit(id, similarity)`` when an entry is served, ``on_miss()`` when a lookup finds nothing usable,
* ``on_error(id, error)`` when a verified reuse measured ``error`` (relative error, 0 is perfect),
* ``on_remove(id)`` when an entry leaves the bank for any reason,
* ``victims(nbytes_needed)`` to learn what to drop, and ``state_dict()`` / ``load_state_dict()`` to persist.

Events for ids the policy does not track (an entry removed a moment ago) are ignored, so the bank never has to order
its calls around evictions. Inserting an id that is already tracked replaces that entry: it starts afresh.
"""

from __future__ import annotations

import heapq
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch


class Policy(ABC):
    """Base class: keeps each entry's size so :meth:`victims` can stop once enough bytes are freed.

    Subclasses implement :meth:`_track`, :meth:`_untrack` and :meth:`eviction_order`, and extend
    :meth:`state_dict` / :meth:`load_state_dict` with whatever else decides their order.
    """

    promotes_on_hit: bool | None = True
    """What a hit does to the hit entry's place in the eviction order: ``True`` moves it later, all else equal (it
    is kept longer), ``False`` leaves the order unchanged, ``None`` makes no claim. The conformance suite checks it
    on entries that differ only by their hits."""

    def __init__(self) -> None:
        self._nbytes: dict[int, int] = {}

    def on_insert(self, entry_id: int, nbytes: int, cost: float = 0.0) -> None:
        """Start tracking ``entry_id`` of ``nbytes`` bytes whose hits save ``cost`` seconds of compute."""
        size = _as_size(nbytes)
        if not isinstance(cost, int | float) or not math.isfinite(cost) or cost < 0:
            raise ValueError(f"on_insert: cost must be a finite number of seconds >= 0, got {cost!r}.")
        entry_id = int(entry_id)
        if entry_id in self._nbytes:
            self.on_remove(entry_id)
        self._nbytes[entry_id] = size
        self._track(entry_id, float(cost))

    def on_hit(self, entry_id: int, similarity: float = 1.0) -> None:  # noqa: B027 - optional hook
        """Called when ``entry_id`` is served."""

    def on_miss(self) -> None:  # noqa: B027 - optional hook
        """Called when a lookup served nothing."""

    def on_error(self, entry_id: int, error: float) -> None:  # noqa: B027 - optional hook
        """Called with the relative error measured when a hit was verified against real compute."""

    def on_remove(self, entry_id: int) -> None:
        """Forget ``entry_id``; unknown ids are ignored."""
        if self._nbytes.pop(int(entry_id), None) is not None:
            self._untrack(int(entry_id))

    def victims(self, nbytes_needed: int) -> list[int]:
        """Ids to drop, in order, until at least ``nbytes_needed`` bytes are freed (at least one id if any).

        Nothing changes until the bank calls :meth:`on_remove` for the ids it actually drops.
        """
        out, freed = [], 0
        for entry_id in self.eviction_order():
            out.append(entry_id)
            freed += self._nbytes[entry_id]
            if freed >= nbytes_needed:
                break
        return out

    def __len__(self) -> int:
        return len(self._nbytes)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._nbytes

    @abstractmethod
    def _track(self, entry_id: int, cost: float) -> None:
        """Start tracking a new entry (a re-inserted id was untracked just before)."""

    @abstractmethod
    def _untrack(self, entry_id: int) -> None:
        """Stop tracking an entry."""

    @abstractmethod
    def eviction_order(self) -> Iterator[int]:
        """Iterate over tracked ids, the first to evict first. Lazy: do not change the policy while iterating."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that restore the policy's bookkeeping. The base class stores ids and sizes in eviction order."""
        order = list(self.eviction_order())
        return {
            "ids": torch.tensor(order, dtype=torch.long),
            "nbytes": torch.tensor([self._nbytes[i] for i in order], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Rebuild from :meth:`state_dict`; re-inserting in eviction order restores order-based policies."""
        ids, nbytes = self._read_entries(state)
        self._clear()
        for entry_id, size in zip(ids, nbytes, strict=True):
            self.on_insert(entry_id, size)

    def _clear(self) -> None:
        for entry_id in list(self._nbytes):
            self.on_remove(entry_id)

    def _read_entries(self, state: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
        """Validated ``ids`` and ``nbytes`` of a saved state, as Python lists."""
        ids = self._column(state, "ids").tolist()
        nbytes = self._column(state, "nbytes", len(ids)).tolist()
        if len(set(ids)) != len(ids):
            raise ValueError(f"{type(self).__name__} state: 'ids' holds duplicates.")
        if any(n < 0 for n in nbytes):
            raise ValueError(f"{type(self).__name__} state: 'nbytes' holds negative sizes.")
        return ids, nbytes

    def _column(self, state: dict[str, torch.Tensor], name: str, length: int | None = None) -> torch.Tensor:
        """``state[name]``, checked to be a 1-d tensor (of ``length`` items if given)."""
        where = f"{type(self).__name__} state"
        if name not in state:
            raise ValueError(f"{where} lacks {name!r}; it has {sorted(state)}.")
        value = state[name]
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            raise ValueError(f"{where}: {name!r} must be a 1-d tensor, got {_describe(value)}.")
        if length is not None and value.numel() != length:
            raise ValueError(f"{where}: {name!r} has {value.numel()} items, expected {length}.")
        if name in ("ids", "nbytes") and (value.dtype.is_floating_point or value.dtype.is_complex):
            raise ValueError(f"{where}: {name!r} must hold integers, got {value.dtype}.")
        return value

    def _scalar(self, state: dict[str, torch.Tensor], name: str) -> float:
        """``state[name]`` as a Python number, checked to be a finite 0-d tensor."""
        if name not in state:
            raise ValueError(f"{type(self).__name__} state lacks {name!r}; it has {sorted(state)}.")
        value = state[name]
        if not isinstance(value, torch.Tensor) or value.dim() != 0 or not torch.isfinite(value):
            raise ValueError(f"{type(self).__name__} state: {name!r} must be a finite 0-d tensor, got {value!r}.")
        return value.item()


class ScoredPolicy(Policy):
    """A policy that evicts the lowest score first, ties going to the entry touched longest ago.

    Scores live in a binary heap with lazy invalidation: a new score pushes a new heap item and the old one is
    skipped when it surfaces, so a hit costs O(log n) and :meth:`victims` O(k log n) for k victims, instead of a
    sort of every entry per eviction. The heap is rebuilt when stale items outnumber live ones.

    Subclasses set scores with :meth:`_score` and read them with :meth:`_current`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._items: dict[int, tuple[float, int, int]] = {}  # id -> its live heap item (score, touch, id)
        self._heap: list[tuple[float, int, int]] = []
        self._touches = 0

    def _score(self, entry_id: int, score: float, touch: bool = True) -> None:
        """Give ``entry_id`` a new score; ``touch`` also makes it the most recently touched entry."""
        if touch:
            self._touches += 1
            seq = self._touches
        else:
            seq = self._items[entry_id][1]
        item = (score, seq, entry_id)
        if self._items.get(entry_id) == item:
            return
        self._items[entry_id] = item
        heapq.heappush(self._heap, item)
        if len(self._heap) > 2 * len(self._items) + 64:
            self._heap = list(self._items.values())
            heapq.heapify(self._heap)

    def _current(self, entry_id: int) -> float:
        return self._items[entry_id][0]

    def _untrack(self, entry_id: int) -> None:
        self._items.pop(entry_id, None)

    def victims(self, nbytes_needed: int) -> list[int]:
        out, freed, live, chosen = [], 0, [], set()
        while self._heap and (freed < nbytes_needed or not out):
            item = heapq.heappop(self._heap)
            if self._items.get(item[2]) != item or item[2] in chosen:
                continue  # stale (rescored or removed since pushed), or a copy left by a rescore and back
            chosen.add(item[2])
            live.append(item)
            out.append(item[2])
            freed += self._nbytes[item[2]]
        for item in live:
            heapq.heappush(self._heap, item)
        return out

    def eviction_order(self) -> Iterator[int]:
        """Every tracked id, first victim first. Sorts all entries: for saving and inspection, not per eviction."""
        return (entry_id for _, _, entry_id in sorted(self._items.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        items = sorted(self._items.values())
        return {
            "ids": torch.tensor([i for _, _, i in items], dtype=torch.long),
            "nbytes": torch.tensor([self._nbytes[i] for _, _, i in items], dtype=torch.long),
            "scores": torch.tensor([s for s, _, _ in items], dtype=torch.float64),
            "touched": torch.tensor([t for _, t, _ in items], dtype=torch.long),
            "touches": torch.tensor(self._touches, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore scores and touch order exactly; subclasses then read their own columns."""
        ids, nbytes = self._read_entries(state)
        scores = self._column(state, "scores", len(ids)).tolist()
        touched = self._column(state, "touched", len(ids)).tolist()
        touches = int(self._scalar(state, "touches"))
        if not all(math.isfinite(s) for s in scores) or any(not 0 < t <= touches for t in touched):
            raise ValueError(f"{type(self).__name__} state: 'scores' or 'touched' hold impossible values.")
        self._clear()
        self._nbytes = dict(zip(ids, nbytes, strict=True))
        self._items = {i: (float(s), int(t), i) for i, s, t in zip(ids, scores, touched, strict=True)}
        self._heap = list(self._items.values())
        heapq.heapify(self._heap)
        self._touches = touches


def check_number(owner: str, name: str, value: object, low: float, high: float = math.inf, *, closed: bool) -> float:
    """``value`` as a float if it is a finite real number above ``low`` (or equal, if ``closed``) and at most
    ``high``; otherwise a ``ValueError`` that names the argument, the value and the allowed range."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if closed else value > low) and value <= high
    if not ok:
        allowed = f"{'>=' if closed else '>'} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
        raise ValueError(f"{owner}: {name} must be a finite number {allowed}, got {value!r}.")
    return float(value)


def _as_size(nbytes: object) -> int:
    try:
        size = operator.index(nbytes)
    except TypeError:
        size = -1
    if size < 0:
        raise ValueError(f"on_insert: nbytes must be an int >= 0, got {nbytes!r}.")
    return size


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
