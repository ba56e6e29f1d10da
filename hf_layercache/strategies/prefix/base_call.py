"""The one route to the base model's output of a call: where a group's call splices the cached prefix's hidden states
in, and where an audit reads the states it compares the stored blocks with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ...request import RequestScope, current_scope

OnBaseOutput = Callable[[Any], Any]
"""Applied to the base model's output; returns its replacement, or ``None`` to leave it as it is."""

_ON_BASE_OUTPUT = "prefix.on_base_output"


class BaseModelCall:
    """Runs the cached model's forward with a function applied to the output of its base model (the model owning
    the layer stack, whose output is the final hidden states), before anything reads that output.

    There are two routes because the cached model may or may not be the base model, and exactly one of them is
    taken for a model:

    * the cached model *is* the base model (``LlamaModel``): its output is what the forward returns, so the
      function is applied to the return value; a torch forward hook on it would run only after the request, which
      is this forward, has returned;
    * the cached model is a head around it (``LlamaForCausalLM``): the head (``lm_head``) reads the base model's
      output inside the forward, so the function must run before it does: in the forward hook :meth:`on_output`,
      which the strategy attaches to the base model once (:attr:`hooked`). The hook finds the function in the
      request's thread-local scope, so concurrent requests on other threads never see it (a hook registered for one
      call would fire in theirs too).

    :meth:`call` is the only place either route is taken; the group call and the audit both go through it.
    """

    def __init__(self, base_model: nn.Module, model: nn.Module):
        self.hooked = base_model is not model
        """Whether the base model's output is reached by the forward hook :meth:`on_output` (which the strategy
        attaches to the base model) rather than as the forward's return value."""

    def call(
        self,
        scope: RequestScope,
        forward: Callable[..., Any],
        arguments: dict[str, Any],
        on_base_output: OnBaseOutput,
    ) -> Any:
        """``forward(**arguments)``, with ``on_base_output`` applied to the first base-model output it produces."""
        if not self.hooked:
            output = forward(**arguments)
            replaced = on_base_output(output)
            return output if replaced is None else replaced
        scope.state[_ON_BASE_OUTPUT] = on_base_output
        try:
            return forward(**arguments)
        finally:
            scope.state.pop(_ON_BASE_OUTPUT, None)

    @staticmethod
    def on_output(module: nn.Module, args: Any, output: Any) -> Any:
        """The forward hook on the base model inside a head model: the current call's function, applied once."""
        scope = current_scope()
        on_base_output = scope.state.pop(_ON_BASE_OUTPUT, None) if scope is not None else None
        return on_base_output(output) if on_base_output is not None else None
