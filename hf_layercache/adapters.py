"""Adapters (PEFT, and transformers' adapter API, which injects PEFT's layers): which are active, per request.

A model with adapters computes another function for each active adapter set: switching ``a -> b`` must not serve
``a``'s entries, and ``b -> a`` should find ``a``'s again. So the active set is not an invalidation but part of the
request's key space (:meth:`AdapterLayers.key`): each set has entries of its own, kept side by side.

Adapter layers are found by what they hold rather than by class, so PEFT need not be imported: every PEFT tuner
layer (``BaseTunerLayer``) and auxiliary wrapper (``modules_to_save``, trainable tokens) keeps ``_active_adapter``
and ``_disable_adapters`` on the instance and names its per-adapter containers in ``adapter_layer_names``. A
layer's state is what its forward reads: the active adapters it holds (none when disabled), the merged ones, and
the per-adapter settings named in ``other_param_names`` (``scaling``, ``r``, ``lora_alpha``, ...). The adapters'
weights are watched like every other tensor (:mod:`hf_layercache.watch`) and digested per adapter into the key, so
another process's adapter ``a`` with other weights never shares entries.

A mixed-adapter batch (PEFT's ``adapter_names=`` argument, which PEFT passes to its layers through forward
pre-hooks) gives each row another adapter: :meth:`AdapterLayers.state` is ``None`` then and the request runs
uncached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

_PLAIN = (type(None), bool, int, float, str)


def is_adapter_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer or auxiliary training wrapper (see the module docstring)."""
    holds = module.__dict__
    return "_active_adapter" in holds and "_disable_adapters" in holds


def adapter_prefixes(path: str, layer: nn.Module) -> Iterator[tuple[str, str]]:
    """``(tensor path prefix, adapter name)`` of each per-adapter container entry of the adapter layer at ``path``."""
    names = (*getattr(layer, "adapter_layer_names", ()), *getattr(layer, "other_param_names", ()))
    for container_name in names:  # other_param_names holds per-adapter modules too (LoRA's dropout)
        container: Any = layer
        for part in container_name.split("."):
            container = getattr(container, part, None)
        if isinstance(container, nn.ModuleDict | nn.ParameterDict):
            for adapter in container:
                yield f"{path}.{container_name}.{adapter}" if path else f"{container_name}.{adapter}", str(adapter)


def _layer_state(layer: nn.Module) -> tuple:
    """What the layer's forward reads about adapters, as it is stored (read per request: no interpretation here)."""
    active = layer._active_adapter
    scaling = getattr(layer, "scaling", None)
    return (
        active if isinstance(active, str) else tuple(active),
        layer._disable_adapters,
        tuple(getattr(layer, "merged_adapters", ())),
        tuple(scaling.items()) if isinstance(scaling, dict) else (),
    )


def _effective(layer: nn.Module, state: tuple) -> tuple[tuple[str, ...], tuple[str, ...], tuple]:
    """The adapters the layer's forward applies (active, held, not disabled), the merged ones, their settings."""
    active, disabled, merged, _ = state
    held = set(layer._get_available_adapters()) if hasattr(layer, "_get_available_adapters") else None
    names = (active,) if isinstance(active, str) else active
    applied = () if disabled else tuple(a for a in names if held is None or a in held)
    settings = []
    for name in getattr(layer, "other_param_names", ()):
        values = getattr(layer, name, None)
        if isinstance(values, dict):
            settings.append(tuple(values.get(a) if isinstance(values.get(a), _PLAIN) else "?" for a in applied))
    return applied, merged, tuple(settings)


class AdapterLayers:
    """The adapter layers among some modules, read once per request for the active adapter set."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers

    def __bool__(self) -> bool:
        return bool(self.layers)

    def state(self) -> tuple | None:
        """What the layers' forwards will read about adapters (``()`` without adapter layers), or ``None`` while a
        mixed-adapter batch is running."""
        states = []
        for layer in self.layers:
            if layer._forward_pre_hooks:
                return None
            states.append(_layer_state(layer))
        return tuple(states)

    def key(self, state: tuple, digest_of: Callable[[str], str]) -> str:
        """A stable name for the active adapter set a :meth:`state` describes: what each layer applies, with the
        digest of each adapter's weights (``digest_of(name)``); ``""`` when no adapter is applied anywhere (the base
        model's own key space). Computed once per state (the watch keeps them)."""
        effective = tuple(_effective(layer, layer_state) for layer, layer_state in zip(self.layers, state, strict=True))
        active = sorted({adapter for applied, _, _ in effective for adapter in applied})
        merged = sorted({adapter for _, merged, _ in effective for adapter in merged})
        if not active and not merged:
            return ""
        text = repr((effective, [(a, digest_of(a)) for a in active], [(a, digest_of(a)) for a in merged]))
        return "adapters:" + ",".join(active) + ":" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
