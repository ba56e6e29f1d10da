"""Noticing that the weights changed under the cache, so no entry outlives the weights that computed it.

Entries are valid only for the weights that made them. A training step, ``load_state_dict``, ``model.half()`` or a
move to another device all change the parameters in place or replace them, and none of them tells the cache. Every
in-place update bumps a tensor's version counter, and a replaced tensor has another data pointer, so comparing
``(version, data_ptr)`` of every parameter before a request is a complete and cheap test (a few microseconds for
a hundred parameters: no data is read).

Parameter objects are looked up afresh in their modules' ``_parameters`` each time, because accelerate's offloading
swaps them for meta tensors and back around every forward. Meta tensors hold no data, so they count as unchanged:
offloaded weights live in accelerate's weights map, which is not updated in place.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


class WeightsWatch:
    """The parameters of ``modules`` (and their submodules), and whether any changed since :meth:`mark`."""

    def __init__(self, modules: Iterable[nn.Module], beside: Iterable[nn.Module] = ()):
        """Watch ``modules`` except the submodules of ``beside`` (watched elsewhere)."""
        seen: set[int] = {id(module) for other in beside for module in other.modules()}
        self._slots: list[dict] = []
        for owner in modules:
            for module in owner.modules():
                if module._parameters and id(module) not in seen:
                    seen.add(id(module))
                    self._slots.append(module._parameters)
        self._signature = self._read()

    def _read(self) -> tuple[tuple[int, int], ...]:
        return tuple(
            (p._version, p.data_ptr()) if not p.is_meta else (0, 0)
            for slot in self._slots
            for p in slot.values()
            if p is not None
        )

    def changed(self) -> bool:
        """True (once) when some parameter was updated in place or replaced since the last call or :meth:`mark`."""
        signature = self._read()
        if signature == self._signature:
            return False
        self._signature = signature
        return True

    def mark(self) -> None:
        """Take the current weights as the ones the entries belong to."""
        self._signature = self._read()

    def requires_grad(self) -> bool:
        """True when some watched parameter requires a gradient."""
        return any(p.requires_grad for slot in self._slots for p in slot.values() if p is not None)
