"""The ``semantic`` strategy class and its registration: configuration, wiring of banks and hooks, layer checks."""

from __future__ import annotations

import torch

from ...fingerprints import Fingerprint
from ...models import model_spec
from ...registry import get_fingerprint, register_strategy
from ...verified import ErrorBound
from ..stack import StackStrategy
from .config import DEFAULT_FINGERPRINT, SemanticConfig
from .entries import EntryStore, SemanticEntry
from .hook import SemanticLayerHook
from .residual import ResidualReuse
from .run import LayerSlot, RunBuilding
from .search import EntrySearch
from .state import StateReuse
from .verification import Verification


def default_fingerprint() -> str:
    return DEFAULT_FINGERPRINT


@register_strategy("semantic")
class SemanticStrategy(RunBuilding, EntrySearch, Verification, EntryStore, ResidualReuse, StateReuse, StackStrategy):
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
        self._draws = torch.Generator().manual_seed(0)
        self.slots: list[LayerSlot] = []
        """The cached layers in order, as the reuse steps see them."""
        rate = self.config.max_error_rate
        self.error_bound = ErrorBound(rate) if rate is not None else None

    # --- wiring ---------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        self._check_layers()
        key_dim = self.fingerprint.key_dim(self._hidden_size())
        stacks: dict[str, int] = {}
        for rank, layer in enumerate(self.layers):
            position = stacks.get(layer.stack, 0)
            stacks[layer.stack] = position + 1
            expected = {"hidden_size": self.context.spec.hidden_size}
            self.new_bank(layer.name, layer.device, len(self.layers), SemanticEntry, expected=expected, key_dim=key_dim)
            hook = SemanticLayerHook(self, layer, position, rank)
            self.slots.append(hook.slot)
            self.hooks.replace_forward(layer.module, hook)
        self._jump_targets = self._find_jump_targets()

    def detach(self) -> None:
        self.slots.clear()

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
