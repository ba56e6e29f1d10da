"""The strategy contract: what is cached, where the hooks go, and how a hit is served."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..bank import BankState, CacheBank
from ..hooks import ForwardHook, HookRegistry
from ..layers import ArgumentBinder, CachedLayer
from ..request import current_scope

if TYPE_CHECKING:
    from ..config import LayerCacheConfig
    from ..controller import LayerCacheController
    from ..request import RequestScope


class Strategy(ABC):
    """Installs and removes its layer hooks and owns the banks of the layers it caches.

    Subclasses are registered with :func:`hf_layercache.register_strategy` and built as ``cls(controller)``; they
    read the config and the selected layers from the controller, create banks with :meth:`new_bank`, attach through
    :attr:`hooks` (the model's :class:`~hf_layercache.hooks.HookRegistry`, which removes everything on
    ``disable``), and never import model code: everything architecture-specific comes from
    :mod:`hf_layercache.layers`.
    """

    intermediate_states_exact: ClassVar[bool] = True
    """False when hits leave intermediate hidden states that differ from real ones, so requests asking for
    ``output_hidden_states`` must run uncached."""

    serves_attention_maps: ClassVar[bool] = False
    """True when every layer still returns the attention maps it actually used on a hit, so requests with
    ``output_attentions`` need not run uncached (the attention strategy)."""

    config_fields: ClassVar[tuple[str, ...]] = ()
    """The ``LayerCacheConfig`` fields this strategy reads beyond the common ones; it validates them in
    :meth:`check_config`."""

    @classmethod  # noqa: B027 - optional hook
    def check_config(cls, config: LayerCacheConfig) -> None:
        """Raise ``ValueError`` naming the field for a bad value of one of :attr:`config_fields`. Called by
        ``LayerCacheConfig.__post_init__`` for every registered strategy, so a bad value is refused at once."""

    def __init__(self, controller: LayerCacheController):
        self.controller = controller
        self.config = controller.config
        self.layers = controller.layers
        self.banks: dict[str, CacheBank] = {}

    @property
    def hooks(self) -> HookRegistry:
        return self.controller.hooks

    @abstractmethod
    def attach(self) -> None:
        """Create banks and attach through :attr:`hooks`."""

    def detach(self) -> None:  # noqa: B027 - optional hook
        """Forget state derived from the attachments, which the registry has removed (banks stay: a re-attach, as
        ``copy.deepcopy`` does, is warm)."""

    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Called once per top-level forward with its named arguments, before any layer runs."""

    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """Run one top-level forward. Strategies that work on whole requests (prefix reuse) override this to
        change the call, e.g. compute only a suffix; the default runs it unchanged."""
        return original(**arguments)

    default_verify_fraction: ClassVar[float] = 0.0
    """The share of hits verified when the config's ``verify_fraction`` is ``None``."""

    @property
    def verify_fraction(self) -> float:
        configured = self.config.verify_fraction
        return self.default_verify_fraction if configured is None else float(configured)

    def reset_counters(self) -> None:  # noqa: B027 - optional hook
        """Reset counters the strategy keeps beside ``stats()`` (called by ``clear()``)."""

    def report(self) -> dict[str, Any]:
        """Sections the strategy adds to ``stats()`` (the attention strategy: its gates); none by default."""
        return {}

    def saved_banks(self) -> list[str]:
        """The banks a warm cache holds: all of them, unless some only derive from the others."""
        return list(self.banks)

    def heads_changed(self) -> None:  # noqa: B027 - optional hook
        """A head's weights (outside the stacks' owners) changed: drop what depends on whole-model outputs."""

    def banks_replaced(self) -> None:  # noqa: B027 - optional hook
        """Called after the banks were cleared or loaded from a warm cache, for state derived from their entries."""

    def check_state(self, bank_name: str, state: dict[str, torch.Tensor]) -> BankState:
        """Refuse a bank state read from disk that does not fit: its structure, then each entry
        (:meth:`check_entry`). Returns it taken apart."""
        bank = self.banks[bank_name]
        parsed = bank.check_state(state)
        for entry_id, values in parsed.entries.items():
            try:
                self.check_entry(bank_name, values)
                _check_finite(values)
            except ValueError as err:
                raise ValueError(f"entry {entry_id}: {err}") from None
        bank.check_policy(parsed)
        return parsed

    def check_entry(self, bank_name: str, values: dict[str, torch.Tensor]) -> None:  # noqa: B027 - optional hook
        """Refuse one entry read from disk that this strategy could not serve (its typed entry's ``validate``)."""

    def new_bank(self, name: str, device: torch.device, n_banks: int, key_dim: int | None = None) -> CacheBank:
        """The bank called ``name``: built on first attach, kept (warm) when the strategy is attached again."""
        if name not in self.banks:
            self.banks[name] = self.controller.build_bank(name, device, n_banks, key_dim)
        return self.banks[name]


class StackStrategy(Strategy):
    """A strategy that hooks every cached layer of a stack with a :class:`LayerHook` (``exact``, ``semantic``).

    The stack's first cached layer opens the request's run for the stack through :meth:`start_run`; every hooked
    layer of the stack then serves or computes its part of that run.
    """

    @abstractmethod
    def start_run(
        self, scope: RequestScope, layer: CachedLayer, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> Any | None:
        """What this forward pass knows about the stack's rows (which hit, what to store), or ``None`` when the call
        cannot use the cache (a decode step, shapes that do not fit): the stack's layers then run uncached."""


class LayerHook(ForwardHook):
    """The hook on one cached layer of a stack-wise strategy (``exact``, ``semantic``).

    It names the call's arguments, lets the stack's first cached layer open the request's run for the stack
    (``strategy.start_run(scope, layer, arguments, hidden)``, stored in ``scope.state[layer.stack]``), runs the layer
    uncached when the request bypasses the cache or the run is ``None`` (counted as bypassed), and hands every
    other call to :meth:`forward_run`.
    """

    def __init__(self, strategy: StackStrategy, layer: CachedLayer, position: int):
        self.strategy = strategy
        self.layer = layer
        self.position = position
        """Index of the layer among the cached layers of its stack."""
        self.outputs = layer.spec.outputs
        """Length of the tuple the layer returns (0: a tensor); learned from real calls, seeded by its LayerSpec."""
        self.binder: ArgumentBinder | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        scope = current_scope()
        if scope is None:
            return self.original(*args, **kwargs)
        if self.binder is None:
            self.binder = ArgumentBinder(self.original)
        arguments = self.binder.bind(args, kwargs)
        hidden = arguments[self.binder.first]
        run = None
        if scope.bypass_reason is None:
            if self.position == 0:
                scope.state[self.layer.stack] = self.strategy.start_run(scope, self.layer, arguments, hidden)
            run = scope.state.get(self.layer.stack)
        if run is None:
            self.strategy.controller.stats_.record_bypass(self.layer.name, hidden.shape[0])
            # the call as it came: reentrant gradient checkpointing needs the tensors positional to recompute them
            return self.original(*args, **kwargs)
        return self.forward_run(run, arguments, hidden)

    @abstractmethod
    def forward_run(self, run: Any, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        """Serve or compute this layer for a request that may use the cache."""

    def observe(self, out: Any) -> None:
        """Remember the structure of a real output, so a served one can match it."""
        self.outputs = len(out) if isinstance(out, tuple) else 0

    def pack(self, hidden: torch.Tensor) -> Any:
        """A served hidden state in the layer's output structure (extra tuple elements are ``None``)."""
        return hidden if self.outputs == 0 else (hidden, *([None] * (self.outputs - 1)))


def _check_finite(values: dict[str, torch.Tensor]) -> None:
    """A stored NaN or infinity is no state any layer computed from a real input: refuse it rather than serve it."""
    for name, tensor in values.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name!r} holds NaN or infinite values.")
