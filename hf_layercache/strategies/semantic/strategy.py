"""The ``semantic`` strategy class and its registration: configuration, wiring of banks and hooks, layer checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...fingerprints import Fingerprint
from ...models import model_spec
from ...registry import get_fingerprint, register_strategy
from ...verified import OBSERVATIONS, ErrorBound
from ..base import StackStrategy
from .entries import EntryStore
from .hook import SemanticLayerHook
from .residual import ResidualReuse
from .run import LayerSlot, RunBuilding
from .search import EntrySearch
from .state import StateReuse
from .verification import Verification

if TYPE_CHECKING:
    from ...config import LayerCacheConfig


DEFAULT_FINGERPRINT = "minhash"
"""The fingerprint ``fingerprint=None`` resolves to."""


def default_fingerprint() -> str:
    return DEFAULT_FINGERPRINT


@register_strategy("semantic")
class SemanticStrategy(RunBuilding, EntrySearch, Verification, EntryStore, ResidualReuse, StateReuse, StackStrategy):
    """Approximate layer reuse for similar inputs; see the package docstring and docs/semantic.md."""

    default_verify_fraction = 0.02

    config_fields = (
        "reuse",
        "fingerprint_kwargs",
        "verify_fraction",
        "max_error_rate",
        "acceptance",
        "acceptance_cosine",
        "max_unaligned",
    )

    @classmethod
    def check_config(cls, config: LayerCacheConfig) -> None:
        """Refuse bad values of the config fields this strategy declares (whichever strategy is selected)."""
        if config.reuse not in ("residual", "state"):
            raise ValueError(f"reuse={config.reuse!r} is not allowed; use 'residual' or 'state'.")
        for name in ("verify_fraction", "max_unaligned"):
            value = getattr(config, name)
            if value is None and name == "verify_fraction":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}.")
        rate = config.max_error_rate
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 < rate < 1.0:
                raise ValueError(f"max_error_rate must be a probability above 0 and below 1, or None, got {rate!r}.")
            if config.strategy != "semantic":
                raise ValueError(
                    "max_error_rate applies to strategy='semantic' only; this config uses "
                    f"strategy={config.strategy!r}."
                )
        if config.acceptance not in ("cosine", "argmax"):
            raise ValueError(f"acceptance={config.acceptance!r} is not allowed; use 'cosine' or 'argmax'.")
        if config.acceptance == "argmax" and (config.strategy != "semantic" or config.reuse != "state"):
            raise ValueError(
                "acceptance='argmax' judges the prediction a state hit serves, so it needs strategy='semantic' with "
                f"reuse='state'; this config uses strategy={config.strategy!r}, reuse={config.reuse!r}."
            )
        cosine = config.acceptance_cosine
        if isinstance(cosine, bool) or not isinstance(cosine, int | float) or not -1.0 <= cosine <= 1.0:
            raise ValueError(f"acceptance_cosine must be a cosine similarity in [-1, 1], got {cosine!r}.")
        kwargs = config.fingerprint_kwargs
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise ValueError(f"fingerprint_kwargs must be a dict with string keys, got {kwargs!r}.")
        if kwargs or config.fingerprint is not None:  # building one turns a misspelt kwarg into an error now
            name = config.fingerprint or DEFAULT_FINGERPRINT
            try:
                get_fingerprint(name)(**kwargs)
            except TypeError as err:
                raise ValueError(f"fingerprint_kwargs={kwargs!r} do not fit fingerprint {name!r}: {err}") from None

    def __init__(self, controller):
        super().__init__(controller)
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
            self.new_bank(layer.name, layer.device, n_banks=len(self.layers), key_dim=key_dim)
            hook = SemanticLayerHook(self, layer, position, rank)
            self.slots.append(hook.slot)
            self.hooks.replace_forward(layer.module, hook)
        self._jump_targets = self._find_jump_targets()

    def detach(self) -> None:
        self.slots.clear()

    def banks_replaced(self) -> None:
        if self.error_bound is not None:
            for name, bank in self.banks.items():
                self.error_bound.rebuild(name, [values.get(OBSERVATIONS) for _, values in bank.items()])

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
        size = model_spec(self.controller.model).hidden_size
        if not isinstance(size, int):
            raise ValueError("strategy='semantic' needs the model's hidden size (config.hidden_size) to size its keys.")
        return size
