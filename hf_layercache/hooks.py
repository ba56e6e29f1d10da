"""Replacing a module's ``forward`` on the instance, and putting it back exactly.

A forward pre-hook cannot skip a forward, so a cached layer's ``forward`` attribute is replaced by a wrapper that
calls :meth:`ForwardHook.new_forward`. The wrapper is installed *after* accelerate's dispatch hooks, so a cache hit
returns before accelerate would move offloaded weights in. :func:`remove_forward_hook` restores the instance
``__dict__`` to what it was, as accelerate's ``remove_hook_from_module`` does for its own hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

_HOOK_ATTR = "_layer_cache_hook"
_MISSING = object()


class ForwardHook:
    """Base class: ``new_forward`` gets the module and the call's arguments; ``self.original`` runs the layer."""

    original: Callable[..., Any]

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.original(*args, **kwargs)


def attach_forward_hook(module: nn.Module, hook: ForwardHook) -> None:
    if _HOOK_ATTR in module.__dict__:
        raise RuntimeError(f"{type(module).__name__} already has a layer cache hook; disable the cache first.")
    saved_forward = module.__dict__.get("forward", _MISSING)
    hook.original = module.forward

    @functools.wraps(hook.original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return hook.new_forward(module, *args, **kwargs)

    module.__dict__[_HOOK_ATTR] = (hook, saved_forward)
    module.forward = forward


def remove_forward_hook(module: nn.Module) -> None:
    entry = module.__dict__.pop(_HOOK_ATTR, None)
    if entry is None:
        return
    _, saved_forward = entry
    if saved_forward is _MISSING:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = saved_forward


def get_forward_hook(module: nn.Module) -> ForwardHook | None:
    entry = module.__dict__.get(_HOOK_ATTR)
    return entry[0] if entry else None
