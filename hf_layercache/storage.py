"""Where a bank keeps its entries' tensors.

A :class:`Storage` turns an entry's tensors into the ones the bank holds, in two steps: :meth:`Storage.prepare`,
outside the bank's lock (casts and copies), and :meth:`Storage.place`, under it (claiming a place, if the storage has
places). It says what the place costs beyond the tensors' own bytes, and gets the place back with
:meth:`Storage.release` when the entry goes. :class:`TensorStorage`, the default, keeps each tensor on its own, on
the bank's device and in its storage dtype; the prefix strategy's blocks live in slots of slabs that grow with use
(:class:`~hf_layercache.strategies.prefix.slots.SlotStorage`), built for its banks by the bank factory.
"""

from __future__ import annotations

from typing import Any

import torch


class Storage:
    """Each tensor on its own (see the module docstring); subclasses keep them elsewhere."""

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        """Floating tensors are stored in this dtype (``storage_dtype``); ``None`` keeps theirs."""

    def prepare(self, values: dict[str, torch.Tensor], owned: bool = False) -> dict[str, torch.Tensor]:
        """The tensors as the bank stores them: detached, cast, on the bank's device, each in memory of its own.

        A stored tensor never shares memory with the tensor it was made from: that one is the model's or the
        caller's (a row of the output the caller holds and may normalise in place; a view of a whole batch, which
        it would keep alive), and an inference tensor could not be updated in place later. ``owned``: the tensors
        are the bank's to keep (read from a file), so one already as the bank stores it is kept, not copied."""
        return {name: self._own(t, owned) for name, t in values.items()}

    def place(self, values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any, int]:
        """Claim a place for a prepared entry (under the bank's lock): the values as held, a handle for
        :meth:`release`, and the bytes the place costs beyond the values' own."""
        return values, None, 0

    def release(self, handle: Any) -> None:
        """The entry of ``handle`` is gone: its place is free."""

    def export(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An entry's tensors for saving, each with a storage of its own."""
        return values

    def _own(self, t: torch.Tensor, owned: bool = False) -> torch.Tensor:
        source = t = t.detach()
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        if self.device is not None:
            t = t.to(self.device)
        shared = not owned and t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
        if shared or t.is_inference() or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
        return t
