"""The strategy contract: what is cached, where the hooks go, and how a hit is served."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..bank import CacheBank
from ..hooks import ForwardHook, attach_forward_hook, remove_forward_hook

if TYPE_CHECKING:
    from ..controller import LayerCacheController
    from ..request import RequestScope


class Strategy(ABC):
    """Installs and removes its layer hooks and owns the banks of the layers it caches.

    Subclasses are registered with :func:`hf_layercache.register_strategy` and built as ``cls(controller)``; they
    read the config and the selected layers from the controller, create banks with :meth:`new_bank` and hooks with
    :meth:`hook_layer`, and never import model code: everything architecture-specific comes from
    :mod:`hf_layercache.layers`.
    """

    intermediate_states_exact: ClassVar[bool] = True
    """False when hits leave intermediate hidden states that differ from real ones, so requests asking for
    ``output_hidden_states`` must run uncached."""

    serves_attention_maps: ClassVar[bool] = False
    """True when every layer still returns the attention maps it actually used on a hit, so requests with
    ``output_attentions`` need not run uncached (the attention strategy)."""

    def __init__(self, controller: LayerCacheController):
        self.controller = controller
        self.config = controller.config
        self.layers = controller.layers
        self.banks: dict[str, CacheBank] = {}
        self._hooked: list[torch.nn.Module] = []

    @abstractmethod
    def attach(self) -> None:
        """Create banks and install hooks."""

    def detach(self) -> None:
        """Remove every hook this strategy installed (banks stay, so a re-attach is warm)."""
        for module in self._hooked:
            remove_forward_hook(module)
        self._hooked.clear()

    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Called once per top-level forward with its named arguments, before any layer runs."""

    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """Run one top-level forward. Strategies that work on whole requests (prefix reuse) override this to
        change the call, e.g. compute only a suffix; the default runs it unchanged."""
        return original(**arguments)

    def check_state(self, bank_name: str, state: dict[str, torch.Tensor]) -> None:
        """Refuse a bank state read from disk that does not fit; strategies add checks of their entries."""
        self.banks[bank_name].check_state(state)

    def hook_layer(self, module: torch.nn.Module, hook: ForwardHook) -> None:
        attach_forward_hook(module, hook)
        self._hooked.append(module)

    def new_bank(self, name: str, device: torch.device, n_banks: int, key_dim: int | None = None) -> CacheBank:
        bank = self.controller.build_bank(name, device, n_banks, key_dim)
        self.banks[name] = bank
        return bank
