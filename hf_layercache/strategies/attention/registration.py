"""What the attention strategy changes outside the modules it caches, each as one ``apply``/``undo`` pair for the hook
registry (``hooks.call``), so ``disable()`` leaves transformers and the model exactly as they were:

* :data:`FUNCTIONS`: the attention and mask functions registered under ``ATTN_IMPLEMENTATION`` with transformers'
  ``AttentionInterface`` / ``AttentionMaskInterface``;
* :class:`ImplementationSelection`: ``model.set_attn_implementation(ATTN_IMPLEMENTATION)`` and the configs'
  previous ``_attn_implementation_internal`` put back."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from .function import ATTN_IMPLEMENTATION, attention_forward, boolean_mask

_MISSING = object()
_FIELD = "_attn_implementation_internal"
"""The config attribute behind ``config._attn_implementation``, which ``set_attn_implementation`` writes."""


class InterfaceRegistration:
    """Functions registered under one name in transformers' interfaces, for as long as some model uses them.

    Why counted: the interfaces' mappings are class-wide dicts, shared by every model in the process, while each
    cached model attaches and detaches on its own. The first :meth:`register` registers, each model's registry
    holds one :meth:`unregister`, and the last puts back what the mappings held under the name before (nothing,
    normally: transformers' interfaces have no unregister, so the entries are popped from their dicts)."""

    def __init__(self, name: str, functions: dict[type[Any], Callable[..., Any]]):
        self.name = name
        self.functions = functions
        """Per interface class (``AttentionInterface``, ``AttentionMaskInterface``), the function registered in it."""
        self._users = 0
        self._previous: dict[type[Any], Any] = {}
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        """What the hook registry's inventory calls this attachment."""
        return " + ".join(f"{interface.__name__}[{self.name!r}]" for interface in self.functions)

    def register(self) -> None:
        with self._lock:
            if self._users == 0:
                for interface, function in self.functions.items():
                    self._previous[interface] = interface._global_mapping.get(self.name, _MISSING)
                    interface.register(self.name, function)
            self._users += 1

    def unregister(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for interface, previous in self._previous.items():
                    if previous is _MISSING:
                        interface._global_mapping.pop(self.name, None)
                    else:
                        interface._global_mapping[self.name] = previous
                self._previous.clear()


FUNCTIONS = InterfaceRegistration(
    ATTN_IMPLEMENTATION, {AttentionInterface: attention_forward, AttentionMaskInterface: boolean_mask}
)
"""The attention strategy's functions: one registration per process, shared by every cached model."""


class ImplementationSelection:
    """``model.set_attn_implementation(implementation)``, undone exactly.

    ``set_attn_implementation`` writes ``_attn_implementation_internal`` into the model's config and into every
    sub-config and submodel config it reaches (and checks the implementation on the way). :meth:`apply` first notes
    what each of those configs held in its instance ``__dict__``; :meth:`undo` writes exactly that back (removing the
    attribute where there was none), so a model that was on sdpa, eager or a mix per sub-config is again."""

    def __init__(self, model: nn.Module, implementation: str):
        self.model = model
        self.implementation = implementation
        self._previous: list[tuple[Any, Any]] = []

    def apply(self) -> None:
        self._previous = [(config, config.__dict__.get(_FIELD, _MISSING)) for config in _attention_configs(self.model)]
        try:
            self.model.set_attn_implementation(self.implementation)
        except BaseException:  # not recorded in the registry, so nothing else would put back what it changed
            self.undo()
            raise

    def undo(self) -> None:
        for config, previous in reversed(self._previous):
            if previous is _MISSING:
                config.__dict__.pop(_FIELD, None)
            else:
                config.__dict__[_FIELD] = previous
        self._previous = []


def _attention_configs(model: nn.Module) -> list[Any]:
    """Every config whose ``_attn_implementation`` ``set_attn_implementation`` may change: each pre-trained
    submodel's config and, recursively, their sub-configs."""
    seen: dict[int, Any] = {}
    pending = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        pending += [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None)]
    return list(seen.values())
