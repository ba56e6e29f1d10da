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


def _refuse_copy(what: str, holder: str) -> None:
    raise TypeError(
        f"{holder} carries a layer cache hook, so it cannot be {what} alone. Copy the whole model that has the cache "
        "(copy.deepcopy(model) gives a copy with its own warm cache), or call hf_layercache.disable(model) first; "
        "warm caches are saved with model.save_pretrained(...)."
    )


class ForwardHook:
    """Base class: ``new_forward`` gets the module and the call's arguments; ``self.original`` runs the layer.

    Hooks refuse to be copied or pickled: a copy would keep running the original model's modules.
    """

    original: Callable[..., Any]

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.original(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> None:
        _refuse_copy("deep-copied", "A module")

    def __reduce_ex__(self, protocol: int) -> None:
        _refuse_copy("pickled (torch.save pickles it)", "A module")


class HookedForward:
    """What a hooked module's ``forward`` attribute becomes: calls ``hook.new_forward(module, ...)``.

    A callable object rather than a closure so that copying or pickling a hooked module *alone* fails with an error
    that says why (a copied closure would keep calling the original module's layer: silently the wrong weights).
    ``copy.deepcopy`` of the model that owns the cache works: the controller copies the model unhooked and hooks
    the copy (see :meth:`LayerCacheController.copy_model`).
    """

    def __init__(self, module: nn.Module, hook: ForwardHook):
        self.module = module
        self.hook = hook
        functools.update_wrapper(self, hook.original)  # signature, name and docs of the wrapped forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hook.new_forward(self.module, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> None:
        _refuse_copy("deep-copied", type(self.module).__name__)

    def __reduce_ex__(self, protocol: int) -> None:
        _refuse_copy("pickled (torch.save pickles it)", type(self.module).__name__)


def attach_forward_hook(module: nn.Module, hook: ForwardHook) -> None:
    if _HOOK_ATTR in module.__dict__:
        raise RuntimeError(f"{type(module).__name__} already has a layer cache hook; disable the cache first.")
    saved_forward = module.__dict__.get("forward", _MISSING)
    hook.original = module.forward
    module.__dict__[_HOOK_ATTR] = (hook, saved_forward)
    module.forward = HookedForward(module, hook)


def remove_forward_hook(module: nn.Module) -> None:
    entry = module.__dict__.pop(_HOOK_ATTR, None)
    if entry is None:
        return
    _, saved_forward = entry
    if saved_forward is _MISSING:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = saved_forward
