"""Forward hooks that other code puts on a cached model's modules: while one is there, requests compute.

Steering vectors, activation patching, probes and debuggers (``register_forward_hook``, ``register_forward_pre_hook``,
``torch.nn.modules.module.register_module_forward_hook``) change or watch what a module computes, and a served layer
or a served whole-model output skips them: a hook that adds a vector to layer 0's output had no effect on the
layers served after it, and a hook that records a sub-module's output recorded nothing. The cache cannot know what
an opaque function does, so a request computes uncached while any hook it does not know is on a module of the model
(below its root, whose hooks run around the cache and see what it serves) or registered for every module. Entries
made before stay valid: remove the hook and requests hit again.

Known hooks are the value-neutral ones libraries install (transformers' output capturing, which records hidden
states and attention maps only when a call asks for them, which the controller handles; its
``enable_input_require_grads``, ``requires_grad`` only; this package's own), torch's pruning, weight norm and
spectral norm pre-hooks (they compute a weight from tensors registered on the module, which the model watch
follows), and any a user marks with :func:`value_neutral_hook` (timers, counters), knowing that a served layer
skips the hooks of its sub-modules.

A hook is registered through a :class:`torch.utils.hooks.RemovableHandle`, whose class counter moves on every
registration in the process: while it stands still (and the model's modules are the same), a model found free of
unknown hooks still is, and the per-request check is one comparison. Removals need no notice: they leave fewer hooks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

_Hook = TypeVar("_Hook", bound=Callable[..., Any])

_KNOWN_HOOKS = (
    ("transformers.utils.output_capturing", "install_output_capuring_hook."),  # sic: transformers' spelling
    ("transformers.modeling_utils", "PreTrainedModel.enable_input_require_grads."),
    ("hf_layercache.", ""),
    # pre-hooks that compute a module's weight from tensors registered on it (weight_orig and weight_mask; g and v;
    # weight_orig, u and v, which only training updates), all of which the model watch follows
    ("torch.nn.utils.prune", ""),
    ("torch.nn.utils.weight_norm", ""),
    ("torch.nn.utils.spectral_norm", ""),
)
"""``(module prefix, qualified name prefix)`` of the hook functions (or callable objects' classes) whose effect the
cache sees: value-neutral ones, and ones that compute from tensors the model watch follows."""


_MARK = "__hf_layercache_value_neutral__"


def value_neutral_hook(hook: _Hook) -> _Hook:
    """Mark ``hook`` (a function, a bound method's function, or a callable object) as a forward hook that changes
    no value, e.g. a timer or a call counter, so that the cache keeps serving while it is registered. It runs when
    its module runs: on a served request that may be never (a served layer skips its sub-modules, a served
    whole-model output every module). Returns ``hook``, so it works as a decorator."""
    try:
        setattr(getattr(hook, "__func__", hook), _MARK, True)
    except (AttributeError, TypeError):
        raise TypeError(
            f"value_neutral_hook cannot mark {hook!r} (it takes no attributes, as builtins do): wrap it in a function "
            "of your own and mark and register that."
        ) from None
    return hook


def _known(hook: Callable[..., Any]) -> bool:
    if getattr(hook, _MARK, False):
        return True
    module, name = getattr(hook, "__module__", None) or "", getattr(hook, "__qualname__", None) or ""
    return any(module.startswith(m) and name.startswith(q) for m, q in _KNOWN_HOOKS)


def _describe(hook: Callable[..., Any]) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


class ForeignHooks:
    """Whether a hook the cache does not know runs inside ``model``'s forward (module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._clean_at: tuple[int, int] | None = None
        """``(RemovableHandle.next_id, module generation)`` when the model was last found free of unknown hooks."""
        self._warned: set[str] = set()

    def reason(self, module_generation: int) -> str | None:
        """Why requests must compute now (the first unknown hook found), or ``None``. ``module_generation`` changes
        whenever the model's modules may have (:attr:`ModelWatch.scans`): a module put in may carry hooks already."""
        now = (RemovableHandle.next_id, module_generation)
        if now == self._clean_at:
            return None
        found = next(self._unknown(), None)
        self._clean_at = now if found is None else None
        if found is not None and found not in self._warned:
            self._warned.add(found)
            warnings.warn(
                f"hf_layercache: requests compute uncached while {found} is on the model (a served layer would skip "
                "it); remove it and the cache serves again, or mark it with hf_layercache.value_neutral_hook if it "
                "changes no value. Warned once per hook.",
                stacklevel=4,
            )
        return found

    def _unknown(self) -> Iterator[str]:
        for kind, hooks in (
            ("global forward pre-hook", torch_module._global_forward_pre_hooks),
            ("global forward hook", torch_module._global_forward_hooks),
        ):
            for hook in hooks.values():
                if not _known(hook):
                    yield f"a {kind} ({_describe(hook)})"
        for path, module in self.model.named_modules():
            if not path:
                continue  # the root's hooks run around the cache, on what it serves
            for kind, hooks in (("pre-hook", module._forward_pre_hooks), ("hook", module._forward_hooks)):
                for hook in hooks.values():
                    if not _known(hook):
                        yield f"a forward {kind} on {path} ({_describe(hook)})"
