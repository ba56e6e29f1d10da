"""Block storage in a few large tensors: the prefix bank's entries are views of preallocated slots.

Thousands of entries of three mid-sized tensors each leave the C allocator's heap fragmented: resident memory grew
to 1.7-2.1x ``max_memory`` on a 2,000-block soak, and stayed there after ``clear()`` (``malloc_trim`` gave it
back, so it was the heap, not the entries). Here every block's keys, values and hidden states live in one slot of
three slabs (one allocation each, sized for the budget up front; the kernel commits a page when it is first
written, and the lowest free slot is always taken, so the pages in use follow the entries the bank holds). The
bank charges each entry its whole slot, so a partial block costs what it really holds, and the budget bounds what
is allocated.
"""

from __future__ import annotations

import heapq
from typing import Any

import torch

from ...storage import Storage
from .block import BlockShape

_POOLED = ("key", "value", "hidden")
"""The entry fields kept in slots (``tokens`` and ``parent`` are a few bytes, kept as they come)."""


class SlotStorage(Storage):
    """A :class:`~hf_layercache.storage.Storage` keeping prefix blocks in slots of preallocated slabs."""

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
        self._slabs: dict[str, torch.Tensor] = {}
        self._free: list[int] = []
        self._held: dict[int, dict[str, torch.Tensor]] = {}
        """Per slot in use, the values dict the bank holds (its views move when the slabs grow)."""
        self._slab_storages: set[int] = set()

    # --- slots ----------------------------------------------------------------------------------------------------
    def _slot_shapes(self, capacity: int) -> dict[str, tuple[int, ...]]:
        s = self.shape
        kv = (capacity, s.n_layers, s.kv_heads, s.block_size, s.head_dim)
        return {"key": kv, "value": kv, "hidden": (capacity, s.block_size, s.hidden_size)}

    def slot_bytes(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return sum(size * torch.Size(shape[1:]).numel() for shape in self._slot_shapes(1).values())

    def _capacity(self, dtype: torch.dtype) -> int:
        """Slots enough for the budget (every entry costs at least its slot), or 64 to start with and grow."""
        limits = [self.max_entries] if self.max_entries is not None else []
        if self.max_bytes is not None:
            limits.append(self.max_bytes // self.slot_bytes(dtype) + 1)
        return max(1, min(limits)) if limits else 64

    def _grow(self, dtype: torch.dtype, device: torch.device) -> None:
        """New slabs (first use, or twice as many slots); the entries in slots move into them."""
        old = len(next(iter(self._slabs.values()))) if self._slabs else 0
        capacity = max(self._capacity(dtype), 2 * old)
        slabs = {
            name: torch.empty(shape, dtype=dtype, device=device) for name, shape in self._slot_shapes(capacity).items()
        }
        for name, slab in self._slabs.items():
            slabs[name][:old] = slab
        self._slabs = slabs
        self._slab_storages = {slab.untyped_storage().data_ptr() for slab in slabs.values()}
        for slot, values in self._held.items():
            for name in _POOLED:
                values[name] = self._view(name, slot, len(values["tokens"]))
        self._free = list(range(old, capacity))  # the old slots are all in use: growth happens only when none is free
        heapq.heapify(self._free)

    def _view(self, name: str, slot: int, n: int) -> torch.Tensor:
        slab = self._slabs[name][slot]
        return slab[:n] if name == "hidden" else slab[:, :, :n]

    def _fits(self, values: dict[str, torch.Tensor]) -> bool:
        key = values.get("key")
        if key is None or "tokens" not in values or key.dim() != 4:
            return False
        n = key.shape[2]
        if self._slabs and self._slabs["key"].dtype != self._dtype_of(key):
            return False
        return values["tokens"].numel() == n and 1 <= n <= self.shape.block_size

    def _dtype_of(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype

    def _slack_of(self, values: dict[str, torch.Tensor]) -> int:
        """The bytes of an entry's slot beyond its own tensors' data (a partial block's unused tokens)."""
        return self.slot_bytes(values["key"].dtype) - sum(values[n].numel() * values[n].element_size() for n in _POOLED)

    # --- the storage contract -------------------------------------------------------------------------------------
    def prepare(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Blocks that fit a slot are copied into it by :meth:`place` (no copy here); anything else as by default."""
        if not self._fits(values):
            return super().prepare(values)
        return {name: t.detach() if name in _POOLED else self._own(t) for name, t in values.items()}

    def place(self, values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any, int]:
        """Copy the block's states into the lowest free slot; its values as views of that slot."""
        if not self._fits(values):
            return super().place(values)
        if any(values[name].untyped_storage().data_ptr() in self._slab_storages for name in _POOLED):
            values = {name: t.clone() if name in _POOLED else t for name, t in values.items()}  # from another slot
        key = values["key"]
        if not self._free:
            self._grow(self._dtype_of(key), self.device if self.device is not None else key.device)
        slot = heapq.heappop(self._free)
        n = key.shape[2]
        placed = dict(values)
        with torch.inference_mode(False):
            for name in _POOLED:
                view = self._view(name, slot, n)
                view.copy_(values[name])
                placed[name] = view
        self._held[slot] = placed
        return placed, slot, self._slack_of(placed)

    def release(self, handle: Any) -> None:
        if handle is not None and self._held.pop(handle, None) is not None:
            heapq.heappush(self._free, handle)

    def export(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of the slot's views (files share no storage)."""
        return {k: v.clone() if v.untyped_storage().data_ptr() in self._slab_storages else v for k, v in values.items()}
