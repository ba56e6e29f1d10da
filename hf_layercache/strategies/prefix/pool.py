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
import threading

import torch

from ...bank import CacheBank
from .block import BlockShape

_POOLED = ("key", "value", "hidden")
"""The entry fields kept in slots (``tokens`` and ``parent`` are a few bytes, kept as they come)."""


class PooledBank(CacheBank):
    """A :class:`~hf_layercache.bank.CacheBank` whose prefix blocks live in slots of preallocated slabs."""

    def __init__(self, bank: CacheBank, shape: BlockShape):
        super().__init__(
            bank.name,
            bank.policy,
            bank.backend,
            bank.max_entries,
            bank.max_bytes,
            bank.device,
            bank.storage_dtype,
        )
        self.shape = shape
        self._slabs: dict[str, torch.Tensor] = {}
        self._free: list[int] = []
        self._slots: dict[int, int] = {}  # entry id -> slot
        self._slack = 0  # bytes of the slots of pooled entries beyond their own tensors' data
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
        """New slabs (first use, or twice as many slots); pooled entries move into them."""
        old = len(next(iter(self._slabs.values()))) if self._slabs else 0
        capacity = max(self._capacity(dtype), 2 * old)
        slabs = {
            name: torch.empty(shape, dtype=dtype, device=device) for name, shape in self._slot_shapes(capacity).items()
        }
        for name, slab in self._slabs.items():
            slabs[name][:old] = slab
        self._slabs = slabs
        self._slab_storages = {slab.untyped_storage().data_ptr() for slab in slabs.values()}
        for entry_id, slot in self._slots.items():
            values = self._entries[entry_id].values
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
        return self.storage_dtype if self.storage_dtype is not None and t.is_floating_point() else t.dtype

    def _place(self, values: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
        """Copy the block's states into a free slot; its values as views of that slot."""
        key = values["key"]
        device = self.device if self.device is not None else key.device
        if not self._free:
            self._grow(self._dtype_of(key), device)
        slot = heapq.heappop(self._free)
        n = key.shape[2]
        placed = dict(values)
        for name in _POOLED:
            view = self._view(name, slot, n)
            view.copy_(values[name].detach())
            placed[name] = view
        return slot, placed

    def _slack_of(self, values: dict[str, torch.Tensor]) -> int:
        """The bytes of an entry's slot beyond its own tensors' data (a partial block's unused tokens)."""
        return self.slot_bytes(values["key"].dtype) - sum(values[n].numel() * values[n].element_size() for n in _POOLED)

    def reading(self) -> threading.RLock:
        """Hold while copying out of slots: no insert can reuse a slot meanwhile."""
        return self._lock

    def serves(self, entry_id: int, key: torch.Tensor) -> bool:
        """Whether ``key`` (an entry's ``key`` as looked up) is still that entry's: its slot was not handed to
        another block since. Call under :meth:`reading`."""
        entry = self._entries.get(entry_id)
        return entry is not None and entry.values.get("key") is key

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() in self._slab_storages:
            return t  # a slot's view: it is the storage
        return super()._stored(t)

    # --- the bank's operations, with slots ------------------------------------------------------------------------
    def put(
        self,
        values: dict[str, torch.Tensor],
        digest: bytes | None = None,
        key: torch.Tensor | None = None,
        cost: float = 0.0,
        namespace: int = 0,
    ) -> int | None:
        if not self._fits(values):
            return super().put(values, digest, key, cost, namespace)
        with self._lock, torch.inference_mode(False):
            slot, placed = self._place(values)
            slack = self._slack_of(placed)
            self._slack += slack  # charged before the insert makes room, so the room made covers the whole slot
            entry_id = super().put(placed, digest, key, cost, namespace)
            if entry_id is None:
                self._slack -= slack
                heapq.heappush(self._free, slot)
            else:
                self._slots[entry_id] = slot
            return entry_id

    def _remove(self, entry_ids: list[int]) -> None:
        for entry_id in entry_ids:
            slot = self._slots.pop(entry_id, None)
            if slot is not None and entry_id in self._entries:
                self._slack -= self._slack_of(self._entries[entry_id].values)
                heapq.heappush(self._free, slot)
        super()._remove(entry_ids)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self._slack

    def state_dict(self) -> dict[str, torch.Tensor]:
        """As saved by any bank: each entry's own tensors (copies of its slot's views; files share no storage)."""
        state = super().state_dict()
        return {k: v.clone() if v.untyped_storage().data_ptr() in self._slab_storages else v for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load as any bank does, then move every block into a slot (and cut to the budget, slots counted)."""
        super().load_state_dict(state)
        with self._lock, torch.inference_mode(False):
            for entry_id, entry in list(self._entries.items()):
                if entry_id in self._slots or not self._fits(entry.values):
                    continue
                slot, placed = self._place(entry.values)
                entry.values.update(placed)
                self._slots[entry_id] = slot
                self._slack += self._slack_of(placed)
            self._make_room(0, incoming=0)
