"""Strategies that hook every cached layer of a stack (``exact``, ``semantic``): the stack's run and the layer hook.

The stack's first cached layer opens the request's *run* for the stack (``StackStrategy.start_run``: which rows hit,
what to store), kept in the request scope under the stack's name; every hooked layer of the stack then serves or
computes its part of that run (``LayerHook.forward_run``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from ..hooks import ForwardHook
from ..layers import ArgumentBinder, CachedLayer
from ..request import RequestScope, current_scope
from ..stats import CacheStats
from .base import Strategy

StartRun = Callable[[RequestScope, CachedLayer, dict[str, Any], torch.Tensor], Any]
"""``start_run(scope, layer, arguments, hidden)``: the stack's run for this forward pass, or ``None``."""


class StackStrategy(Strategy):
    """A strategy whose hooks sit on every cached layer of each stack."""

    compiles = True  # the layer hooks are compile boundaries; each layer's own forward compiles

    @abstractmethod
    def start_run(
        self, scope: RequestScope, layer: CachedLayer, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> Any | None:
        """What this forward pass knows about the stack's rows (which hit, what to store), or ``None`` when the call
        cannot use the cache (a decode step, shapes that do not fit): the stack's layers then run uncached."""


class LayerHook(ForwardHook):
    """The hook on one cached layer of a stack.

    It names the call's arguments, lets the stack's first cached layer open the request's run (``start_run``,
    stored in ``scope.state[layer.stack]``), runs the layer uncached when the request bypasses the cache or the run
    is ``None`` (counted as bypassed), and hands every other call to :meth:`forward_run`.
    """

    def __init__(self, layer: CachedLayer, position: int, start_run: StartRun, counters: CacheStats):
        self.layer = layer
        self.position = position
        """Index of the layer among the cached layers of its stack."""
        self.start_run = start_run
        self.counters = counters
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
                scope.state[self.layer.stack] = self.start_run(scope, self.layer, arguments, hidden)
            run = scope.state.get(self.layer.stack)
        if run is None:
            self.counters.record_bypass(self.layer.name, hidden.shape[0])
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
