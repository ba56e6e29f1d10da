"""Every way the cache attaches to a model, in one registry that removes them all exactly.

A forward pre-hook cannot skip a forward, so a cached layer's ``forward`` attribute is replaced on the instance by a
:class:`HookedForward` that calls :meth:`ForwardHook.new_forward`. It is installed *after* accelerate's dispatch
hooks, so a cache hit returns before accelerate would move offloaded weights in. The other attachments are torch
forward hooks, attributes set on instances (the attention strategy's per-module state, ``model.layer_cache``) and
calls with an inverse (registering an attention function with transformers, selecting it in the configs).

:class:`HookRegistry` (one per cached model, ``controller.hooks``) records each attachment with its undo, named per
module as diffusers' ``HookRegistry`` names its hooks, and :meth:`HookRegistry.remove_all` undoes them newest
first: like accelerate's ``remove_hook_from_module``, every instance ``__dict__`` ends exactly as it was.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

try:  # private, but the only way to leave compiled code and come back (see run_eagerly); transformers imports both
    from torch._C._dynamo.eval_frame import set_eval_frame
    from torch._dynamo.decorators import skip as skip_frame
except ImportError:  # a torch that moved them: the hooks are only torch.compiler.disable'd, and the layers run eagerly

    def set_eval_frame(callback: Any) -> Any:
        return None

    skip_frame = torch.compiler.disable

_MISSING = object()


# --- torch.compile: the cache's Python runs eagerly, the layers' computation stays compiled -----------------------
class _Compiler(threading.local):
    callback: Any = None
    """The frame-evaluation callback of the ``torch.compile`` call around the innermost hook (``None``: eager)."""


_compiler = _Compiler()


@skip_frame
def run_eagerly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` (a hook's Python: lookups, thread-local scopes, banks) outside ``torch.compile``.

    Dynamo tracing the cache's code guards on its thread-local state and data-dependent hits (recompiles, graph
    breaks everywhere, compiles of tens of seconds) and hands it tensors it cannot trace. So the frame is skipped
    (``skip_frame``: a graph break where compiled code calls it) and frame evaluation is switched off for what it
    calls, as ``torch.compiler.disable`` does, but the callback it replaced is kept: :func:`call_original` puts it
    back for the model's own forward, which compiles. (``torch.compiler.disable`` keeps that callback to itself.)
    """
    callback = set_eval_frame(None)
    if callback is None and _compiler.callback is None:  # eager, and not inside a compiled call: nothing to keep
        try:
            return fn(*args, **kwargs)
        finally:
            set_eval_frame(None)
    outer, _compiler.callback = _compiler.callback, callback
    try:
        return fn(*args, **kwargs)
    finally:
        _compiler.callback = outer
        set_eval_frame(callback)


def call_original(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a hooked module's original forward under the ``torch.compile`` that the hook interrupted, if any."""
    callback = _compiler.callback
    if callback is None:
        return fn(*args, **kwargs)
    set_eval_frame(callback)
    try:
        return fn(*args, **kwargs)
    finally:
        set_eval_frame(None)


def compiled() -> bool:
    """Whether the running hook was reached from code that ``torch.compile`` compiles."""
    return _compiler.callback is not None


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

    @skip_frame  # a graph break in compiled code, and never compiled itself (one code object for every module)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return run_eagerly(self.hook.new_forward, self.module, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> None:
        _refuse_copy("deep-copied", type(self.module).__name__)

    def __reduce_ex__(self, protocol: int) -> None:
        _refuse_copy("pickled (torch.save pickles it)", type(self.module).__name__)


@dataclass
class Attachment:
    """One thing done to a model, with what undoes it."""

    kind: str
    """``forward``, ``forward_hook``, ``attribute`` or ``call``."""
    target: str
    """What it was done to, e.g. ``BertLayer.forward`` or ``AttentionInterface['hf_layercache']``."""
    undo: Callable[[], None]


def _original(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` as hooks call it: under the ``torch.compile`` their own call interrupted (:func:`call_original`).

    Compiled, the frame that dynamo enters is ``entry``, which inlines ``forward``. Each hooked module gets a code
    object of its own for it: dynamo caches compiled code per code object, and a model's layers share one (their
    class's ``forward``, or transformers' decorators shared by every class), so they would recompile for each layer
    (``layer_idx`` is a static int) and run uncompiled past ``torch._dynamo.config.recompile_limit``.
    """

    def entry(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    code = entry.__code__.replace(co_name=f"{getattr(forward, '__qualname__', 'forward')}_cached")
    entry = types.FunctionType(code, entry.__globals__, code.co_name, None, entry.__closure__)

    @functools.wraps(forward)
    def original(*args: Any, **kwargs: Any) -> Any:
        return call_original(entry, *args, **kwargs)

    return original


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` behind the compile boundary of :class:`HookedForward` (a graph break, its Python run eagerly): for
    forward hooks and the KV cache ``update`` recorder, which compiled layers call."""

    @functools.wraps(fn)
    def eager(*args: Any, **kwargs: Any) -> Any:
        return run_eagerly(fn, *args, **kwargs)

    return skip_frame(eager)


def _set_instance_attribute(owner: Any, name: str, value: Any) -> Callable[[], None]:
    """Write ``owner.__dict__[name]`` (bypassing ``nn.Module.__setattr__``); the returned undo restores it exactly."""
    previous = owner.__dict__.get(name, _MISSING)
    owner.__dict__[name] = value

    def undo() -> None:
        if previous is _MISSING:
            owner.__dict__.pop(name, None)
        else:
            owner.__dict__[name] = previous

    return undo


class HookRegistry:
    """The inventory of one cached model's attachments; :meth:`remove_all` undoes them, newest first."""

    def __init__(self) -> None:
        self._attachments: list[Attachment] = []

    def replace_forward(self, module: nn.Module, hook: ForwardHook) -> None:
        """Route ``module``'s calls through ``hook.new_forward``; ``hook.original`` is the forward it replaces."""
        if isinstance(module.__dict__.get("forward"), HookedForward):
            raise RuntimeError(f"{type(module).__name__} already has a layer cache hook; disable the cache first.")
        hook.original = _original(module.forward)
        undo = _set_instance_attribute(module, "forward", HookedForward(module, hook))
        self._attachments.append(Attachment("forward", f"{type(module).__name__}.forward", undo))

    def forward_hook(self, module: nn.Module, fn: Callable[..., Any], with_kwargs: bool = False) -> None:
        """A torch forward hook (``fn(module, args, output)``, or ``fn(module, args, kwargs, output)`` with
        ``with_kwargs``; it may replace the output). Under ``torch.compile`` it runs eagerly, like the hooks."""
        handle = module.register_forward_hook(eager(fn), with_kwargs=with_kwargs)
        self._attachments.append(Attachment("forward_hook", f"{type(module).__name__} forward hook", handle.remove))

    def set_attribute(self, owner: Any, name: str, value: Any) -> None:
        """An instance attribute, set in ``owner.__dict__`` and restored (or removed) on removal."""
        undo = _set_instance_attribute(owner, name, value)
        self._attachments.append(Attachment("attribute", f"{type(owner).__name__}.{name}", undo))

    def call(self, target: str, apply: Callable[[], None], undo: Callable[[], None]) -> None:
        """Anything else with an inverse, e.g. a registration in a transformers registry."""
        apply()
        self._attachments.append(Attachment("call", target, undo))

    def remove_all(self) -> None:
        while self._attachments:
            self._attachments.pop().undo()

    def inventory(self) -> list[str]:
        """What is attached, oldest first, as ``kind: target`` lines."""
        return [f"{a.kind}: {a.target}" for a in self._attachments]

    def __len__(self) -> int:
        return len(self._attachments)


@contextlib.contextmanager
def temporarily(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.__dict__[name] = value`` for the enclosed code only (e.g. a KV cache's ``update`` while recording)."""
    undo = _set_instance_attribute(owner, name, value)
    try:
        yield
    finally:
        undo()
