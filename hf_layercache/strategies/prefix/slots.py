"""Block storage in a few large tensors that grow with use: the prefix bank's entries are views of slots.

Thousands of entries of three mid-sized tensors each leave the C allocator's heap fragmented: resident memory grew
to 1.7-2.1x ``max_memory`` on a 2,000-block soak, and stayed there after ``clear()`` (``malloc_trim`` gave it
back, so it was the heap, not the entries). Here every block's keys, values and hidden states live in one slot of
three slabs. Slabs are allocated as blocks arrive, never for the whole budget up front: sizing them for
``max_entries`` took 7.7 GB for SmolLM2's first three blocks, and a ``block_size`` of 256 asked for 59 GB on the
first request (on a GPU that would all be committed at once). Each new slab holds as many slots as all earlier ones
together (1, 1, 2, 4, ... slots), so a bank of ``k`` blocks has allocated fewer than ``2k`` slots in ``log2 k``
slabs; slabs are never copied or moved (the views the bank holds stay valid), and the lowest free slot is always
taken, so the pages in use follow the entries the bank holds. Slots are capped at what the bank may hold:
``max_entries``, and the slots whose bytes fit ``max_bytes``, so the slabs never exceed the budget. The bank
charges each entry its whole slot, so a partial block costs what it really holds. Slabs are kept once allocated,
also through ``clear()``: freeing and reallocating them let glibc's dynamic mmap threshold move later slabs into its
heap, where resident memory reached 1.9x a 50 MB budget.

The bank places a new entry before it evicts for it. When every slot is taken and no more may be allocated, the
new block waits in tensors of its own; the eviction that follows frees a slot, and the waiting block moves into it
(its values dict, which the bank holds, is updated in place).
"""

from __future__ import annotations

import bisect
import heapq
from typing import Any

import torch

from ...storage import Storage
from .block import BlockShape

_POOLED = ("key", "value", "hidden")
"""The entry fields kept in slots (``tokens`` and ``parent`` are a few bytes, kept as they come)."""


_GRAIN = 32768
"""Elements below which torch copies on one thread (``at::internal::GRAIN_SIZE``)."""


def copy_on_one_thread(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` in pieces of at most :data:`_GRAIN` elements along the first dimension (each slice
    along it split the same way when it alone is larger). A block is a few hundred KB; copied whole, torch splits it
    between its threads and waits for all of them, and where the cores are shared that wait cost 20 ms a copy
    against 40 us on one thread (measured on the 2-core development machine under load): most of what storing a
    first-seen prompt's blocks cost."""
    if target.device.type != "cpu" or target.numel() <= _GRAIN or target.dim() == 0:
        target.copy_(source)
        return
    if target[0].numel() > _GRAIN:  # e.g. one head of a long prompt's keys
        for part, piece in zip(target, source, strict=True):
            copy_on_one_thread(part, piece)
        return
    rows = _GRAIN // target[0].numel()
    for part, piece in zip(target.split(rows), source.split(rows), strict=True):
        part.copy_(piece)


class _Place:
    """Where a held block lives: its ``slot``, or ``None`` while it waits for one in tensors of its own. The bank
    keeps this as the entry's handle, and ``values`` is the very dict the bank holds, so moving the block into a
    slot updates the bank's entry."""

    __slots__ = ("slot", "values")

    def __init__(self, values: dict[str, torch.Tensor]):
        self.values = values
        self.slot: int | None = None


class SlotStorage(Storage):
    """A :class:`~hf_layercache.storage.Storage` keeping prefix blocks in slots of slabs that grow with use."""

    def __init__(
        self,
        shape: BlockShape,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        max_entries: int | None,
        max_bytes: int | None,
    ):
        super().__init__(device, dtype)
        self.shape = shape
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._slabs: list[dict[str, torch.Tensor]] = []
        """Each slab: one tensor per pooled field, its first dimension the slab's slots."""
        self._starts: list[int] = []
        """The first slot of each slab."""
        self._free: list[int] = []
        """A heap of the free slots: the lowest is taken first."""
        self._waiting: list[_Place] = []
        """Placed blocks waiting for a slot (every slot taken, none more allowed), oldest first."""
        self._slab_storages: set[int] = set()

    # --- sizes ----------------------------------------------------------------------------------------------------
    def _slot_shapes(self, capacity: int) -> dict[str, tuple[int, ...]]:
        s = self.shape
        kv = (capacity, s.n_layers, s.kv_heads, s.block_size, s.head_dim)
        return {"key": kv, "value": kv, "hidden": (capacity, s.block_size, s.hidden_size)}

    def slot_bytes(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return sum(size * torch.Size(shape[1:]).numel() for shape in self._slot_shapes(1).values())

    def slot_limit(self, dtype: torch.dtype) -> int | None:
        """The most slots the slabs may hold: no more than the bank may hold entries (each is charged at least its
        slot), so the slabs stay within ``max_bytes``; ``None`` without a bound."""
        limits = [self.max_entries] if self.max_entries is not None else []
        if self.max_bytes is not None:
            limits.append(self.max_bytes // self.slot_bytes(dtype))
        return min(limits) if limits else None

    @property
    def capacity(self) -> int:
        """Slots allocated."""
        return self._starts[-1] + len(self._slabs[-1]["key"]) if self._slabs else 0

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the slabs allocated (used slots or not)."""
        return sum(t.untyped_storage().nbytes() for slab in self._slabs for t in slab.values())

    def _grow(self, dtype: torch.dtype, device: torch.device) -> bool:
        """A new slab of as many slots as the earlier ones together (one to start), cut to the slot limit; ``False``
        at the limit."""
        limit = self.slot_limit(dtype)
        old = self.capacity
        size = max(1, old) if limit is None else min(max(1, old), limit - old)
        if size <= 0:
            return False
        slab = {name: torch.empty(s, dtype=dtype, device=device) for name, s in self._slot_shapes(size).items()}
        self._slabs.append(slab)
        self._starts.append(old)
        self._slab_storages.update(t.untyped_storage().data_ptr() for t in slab.values())
        for slot in range(old, old + size):
            heapq.heappush(self._free, slot)
        return True

    # --- slots ----------------------------------------------------------------------------------------------------
    def _view(self, name: str, slot: int, n: int) -> torch.Tensor:
        i = bisect.bisect_right(self._starts, slot) - 1
        slab = self._slabs[i][name][slot - self._starts[i]]
        return slab[:n] if name == "hidden" else slab[:, :, :n]

    def _move_in(self, place: _Place, slot: int) -> None:
        """Copy the block's states into ``slot``; its values become views of it."""
        n = place.values["key"].shape[2]
        with torch.inference_mode(False):
            for name in _POOLED:
                view = self._view(name, slot, n)
                copy_on_one_thread(view, place.values[name])
                place.values[name] = view
        place.slot = slot

    def _fits(self, values: dict[str, torch.Tensor]) -> bool:
        key = values.get("key")
        if key is None or "tokens" not in values or key.dim() != 4:
            return False
        n = key.shape[2]
        if self._slabs and self._slabs[0]["key"].dtype != self._dtype_of(key):
            return False
        return values["tokens"].numel() == n and 1 <= n <= self.shape.block_size

    def _dtype_of(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype

    def _slack_of(self, values: dict[str, torch.Tensor]) -> int:
        """The bytes of an entry's slot beyond its own tensors' data (a partial block's unused tokens)."""
        return self.slot_bytes(values["key"].dtype) - sum(values[n].numel() * values[n].element_size() for n in _POOLED)

    # --- the storage contract -------------------------------------------------------------------------------------
    def prepare(self, values: dict[str, torch.Tensor], owned: bool = False) -> dict[str, torch.Tensor]:
        """Blocks that fit a slot are copied into it by :meth:`place` (no copy here); anything else is copied here
        (also when ``owned``: the store lends blocks that are views of a buffer it reuses,
        :class:`~.store.GatherBuffer`)."""
        if not self._fits(values):
            return {name: self._own(t) for name, t in values.items()}
        return {name: t.detach() if name in _POOLED else self._own(t) for name, t in values.items()}

    def place(self, values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any, int]:
        """Copy the block's states into the lowest free slot (growing the slabs when none is free and the limit
        allows); its values as views of that slot. With every slot taken, it waits in copies of its own."""
        if not self._fits(values):
            return super().place(values)
        if any(values[name].untyped_storage().data_ptr() in self._slab_storages for name in _POOLED):
            values = {name: t.clone() if name in _POOLED else t for name, t in values.items()}  # from another slot
        key = values["key"]
        if not self._free:
            self._grow(self._dtype_of(key), self.device if self.device is not None else key.device)
        place = _Place(dict(values))
        if self._free:
            self._move_in(place, heapq.heappop(self._free))
        else:  # the bank evicts next, and the slot that frees is this block's (release)
            place.values.update({name: self._own(values[name]) for name in _POOLED})
            self._waiting.append(place)
        return place.values, place, self._slack_of(place.values)

    def release(self, handle: Any) -> None:
        """The entry's slot goes to the oldest waiting block, else back to the free slots."""
        if not isinstance(handle, _Place):
            return
        if handle.slot is None:
            self._waiting = [place for place in self._waiting if place is not handle]
            return
        slot, handle.slot = handle.slot, None
        if self._waiting:
            self._move_in(self._waiting.pop(0), slot)
        else:
            heapq.heappush(self._free, slot)

    def export(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of the slot's views (files share no storage)."""
        return {k: v.clone() if v.untyped_storage().data_ptr() in self._slab_storages else v for k, v in values.items()}
