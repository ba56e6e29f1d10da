"""The ``semantic`` strategy class and its registration: configuration, the request path, wiring of banks,
collaborators and hooks, and layer checks.

The collaborators that need no layers (:class:`~.run.RunBuilder`, :class:`~.search.EntrySearch`,
:class:`~.verification.Verifier`, :class:`~.store.EntryStore`) are built once in ``__init__``, so the draws and the
error bound carry over when the strategy is attached again; the reuse step and the hooks, which need the layers, are
built in :meth:`SemanticStrategy.attach`. Every collaborator gets what it uses as constructor arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...fingerprints import Fingerprint
from ...layers import CachedLayer
from ...models import model_spec
from ...registry import get_fingerprint, register_strategy
from ...request import RequestScope
from ...verified import ErrorBound
from ..stack import StackStrategy
from .config import DEFAULT_FINGERPRINT, SemanticConfig
from .entries import SemanticEntry
from .hook import ReuseStep, SemanticLayerHook, compute_every_row
from .partial import is_causal, supports_partial
from .parts import ReuseParts
from .residual import ResidualStep
from .run import LayerSlot, RunBuilder, SemanticRun
from .search import EntrySearch
from .state import StateStep
from .store import EntryStore
from .verification import Verifier


@register_strategy("semantic")
class SemanticStrategy(StackStrategy):
    """Approximate layer reuse for similar inputs; see the package docstring and docs/semantic.md."""

    default_verify_fraction = 0.02

    config_class = SemanticConfig

    def __init__(self, context):
        super().__init__(context)
        self.reuse = self.config.reuse
        self.fingerprint: Fingerprint = get_fingerprint(self.config.fingerprint or DEFAULT_FINGERPRINT)(
            **self.config.fingerprint_kwargs
        )
        # Residual hits leave each layer's output the state the rest of the model computed from, as honest as the
        # final output; state hits pass rows through layers unchanged, so their per-layer states would misreport.
        self.intermediate_states_exact = self.reuse == "residual"
        rate = self.config.max_error_rate
        self.error_bound = ErrorBound(rate) if rate is not None else None
        self.run_builder = RunBuilder(self.fingerprint)
        self.search = EntrySearch(
            self.banks, self.config, self.fingerprint, self.error_bound, self.default_verify_fraction
        )
        self.verifier = Verifier(
            self.banks, self.config, self.error_bound, context.record_verdict, type(context.model).__name__
        )
        self.entry_store = EntryStore(self.banks, context.counters, self.config, self.error_bound)
        self.reuse_step: ReuseStep | None = None
        """The step serving every looked-up layer (:class:`~.state.StateStep` or :class:`~.residual.ResidualStep`),
        built on attaching."""

    # --- the request path -----------------------------------------------------------------------------------------
    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:
        self.run_builder.begin_request(scope, arguments)

    def start_run(
        self, scope: RequestScope, layer: CachedLayer, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> SemanticRun | None:
        """The stack's run for this call (:class:`~.run.RunBuilder`); its layers' hooks then hand it to their step."""
        return self.run_builder.start_run(scope, layer, arguments, hidden)

    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """Run the model; with ``acceptance="argmax"``, verified rows are judged by its output, which only now is
        known, and every computed row's entries learn the prediction their request got."""
        output = original(**arguments)
        if self.config.acceptance == "argmax":
            for run in scope.state.values():
                if isinstance(run, SemanticRun):
                    self.verifier.judge_predictions(run, output)
        return output

    # --- wiring ---------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        self._check_layers()
        key_dim = self.fingerprint.key_dim(self._hidden_size())
        slots: list[LayerSlot] = []
        stacks: dict[str, list[LayerSlot]] = {}
        for rank, layer in enumerate(self.layers):
            in_stack = stacks.setdefault(layer.stack, [])
            partial = self.reuse == "state" and supports_partial(layer.module)
            slot = LayerSlot(layer, len(in_stack), rank, partial, is_causal(layer.module))
            in_stack.append(slot)
            slots.append(slot)
            expected = {"hidden_size": self.context.spec.hidden_size}
            self.new_bank(layer.name, layer.device, len(self.layers), SemanticEntry, expected=expected, key_dim=key_dim)
        step = self.reuse_step = self._reuse_step(stacks)
        for slot in slots:
            probe = slot.position < self.fingerprint.after_layers  # the probe's layers always compute
            hook = SemanticLayerHook(slot, self.start_run, self.context.counters, compute_every_row if probe else step)
            self.hooks.replace_forward(slot.layer.module, hook)

    def _reuse_step(self, stacks: dict[str, list[LayerSlot]]) -> ReuseStep:
        """The step every looked-up layer runs, ``reuse`` deciding which."""
        record_lookup = self.context.record_lookup
        parts = ReuseParts(self.run_builder, self.search, self.verifier, self.entry_store, self.banks, record_lookup)
        if self.reuse == "residual":
            return ResidualStep(parts)
        return StateStep(stacks, self.fingerprint.after_layers, self.config, parts)

    def banks_replaced(self) -> None:
        if self.error_bound is not None:
            for name, bank in self.banks.items():
                self.error_bound.rebuild(name, [entry.observations for _, entry in bank.items()])

    def _check_layers(self) -> None:
        for layer in self.layers:
            if layer.spec.outputs > 1:
                raise ValueError(
                    f"strategy='semantic' serves layers that return their hidden state alone; {layer.name} "
                    f"({type(layer.module).__name__}) also returns position biases. Use strategy='exact'."
                )
        stacks = sorted({layer.stack for layer in self.layers})
        if self.config.acceptance == "argmax" and len(stacks) > 1:
            raise ValueError(
                f"acceptance='argmax' judges a prediction made from one layer stack, but this model caches {stacks}; "
                "use acceptance='cosine', or cache one stack with layers=."
            )
        threshold = self.config.threshold
        if isinstance(threshold, list) and len(threshold) != len(self.layers):
            raise ValueError(
                f"threshold has {len(threshold)} values but {len(self.layers)} layers are cached; give one per layer."
            )

    def _hidden_size(self) -> int:
        size = model_spec(self.context.model).hidden_size
        if not isinstance(size, int):
            raise ValueError("strategy='semantic' needs the model's hidden size (config.hidden_size) to size its keys.")
        return size
