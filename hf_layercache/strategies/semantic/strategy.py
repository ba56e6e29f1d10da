"""The ``semantic`` strategy class and its registration: configuration, wiring of banks and hooks, layer checks."""

from __future__ import annotations

import torch

from ...fingerprints import Fingerprint
from ...registry import get_fingerprint, register_strategy
from ...verified import ErrorBound
from ..base import StackStrategy
from .entries import EntryStore
from .hook import SemanticLayerHook
from .residual import ResidualReuse
from .run import RunBuilding
from .search import EntrySearch
from .state import StateReuse
from .verification import Verification


@register_strategy("semantic")
class SemanticStrategy(RunBuilding, EntrySearch, Verification, EntryStore, ResidualReuse, StateReuse, StackStrategy):
    """Approximate layer reuse for similar inputs; see the package docstring and docs/semantic.md."""

    def __init__(self, controller):
        super().__init__(controller)
        self.reuse = self.config.reuse
        self.fingerprint: Fingerprint = get_fingerprint(self.config.fingerprint or "mean_embedding")(
            **self.config.fingerprint_kwargs
        )
        # Residual hits leave each layer's output the state the rest of the model computed from, as honest as the
        # final output; state hits pass rows through layers unchanged, so their per-layer states would misreport.
        self.intermediate_states_exact = self.reuse == "residual"
        self._draws = torch.Generator().manual_seed(0)
        self._hooks: list[SemanticLayerHook] = []
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
            self.new_bank(layer.name, layer.device, n_banks=len(self.layers), key_dim=key_dim)
            hook = SemanticLayerHook(self, layer, position, rank)
            self._hooks.append(hook)
            self.hooks.replace_forward(layer.module, hook)
        self._jump_targets = self._find_jump_targets()

    def detach(self) -> None:
        self._hooks.clear()

    def banks_replaced(self) -> None:
        if self.error_bound is not None:
            for name, bank in self.banks.items():
                self.error_bound.rebuild(name, [values for _, values in bank.items()])

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
        config = getattr(self.controller.model, "config", None)
        text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        size = getattr(text, "hidden_size", None)
        if not isinstance(size, int):
            raise ValueError("strategy='semantic' needs the model's hidden size (config.hidden_size) to size its keys.")
        return size
