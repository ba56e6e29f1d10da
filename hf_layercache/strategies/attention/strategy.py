"""The ``attention`` strategy: the request entry point and the wiring, all through the model's hook registry.

:meth:`AttentionStrategy.attach` registers the functions (:mod:`.registration`), builds one
:class:`~.engine.CachedAttention` per cached layer (its bank, gate and settings, the lookup keys and reuse counters
the layers share, the cache's counters and event sinks) and sets it on the layer's attention module, then selects
the registered implementation. A request: :meth:`AttentionStrategy.begin_request` notes whether it is a prefill,
whether it asks for the maps and its namespace (:mod:`.request_state`); the model then runs as usual, and each
attention call the model makes reaches :func:`~.function.attention_forward`, which hands the cached modules' calls to
their engine."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...kv import find_cache, past_length
from ...layers import CachedLayer
from ...models import dispatches_attention
from ...registry import register_strategy
from ...request import RequestScope, namespace_tag
from ..base import Strategy, StrategyContext
from .config import AttentionConfig
from .counters import ReuseCounters
from .engine import CachedAttention
from .entry import AttentionEntry
from .function import ATTN_IMPLEMENTATION, MODULE_ATTR
from .gate import Gate
from .keys import LookupKeys
from .registration import FUNCTIONS, ImplementationSelection
from .request_state import NAMESPACE_KEY, PREFILL, WEIGHTS


@register_strategy("attention")
class AttentionStrategy(Strategy):
    """Approximate: similar requests reuse earlier softmax attention maps and compute only ``A @ V`` (prefill)."""

    serves_attention_maps = True
    runs_every_module = True  # maps are reused inside the attention function; every module's forward runs
    config_class = AttentionConfig

    def __init__(self, context: StrategyContext):
        super().__init__(context)
        self.keys = LookupKeys(self.config.attention_key_segments, self.config.attention_key_dim)
        """The lookup keys every cached layer computes (their matrices built once per model)."""
        self.reuse_counters = ReuseCounters()
        """How much of the stored maps hits reused, over every layer (:attr:`reuse`)."""
        self.gates: dict[str, Gate] = {}
        """Per cached layer, its gate (``stats()["attention_gate"]``)."""
        self.default_implementation = "eager"
        """The attention implementation the model had before ``enable()``: what runs where the cache does not."""

    # --- wiring -----------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        model = self.context.model
        modules = [self._attention_module(layer) for layer in self.layers]
        self.default_implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        self.hooks.call(FUNCTIONS.target, FUNCTIONS.register, FUNCTIONS.unregister)
        for position, (layer, module) in enumerate(zip(self.layers, modules, strict=True)):
            bank = self.new_bank(
                layer.name,
                layer.device,
                len(self.layers),
                AttentionEntry,
                expected={"heads": _heads(module)},
                key_dim=self.config.attention_key_dim,
            )
            self.gates[layer.name] = Gate(self.config.attention_gate_interval)
            cached = CachedAttention(
                layer,
                bank,
                self.config.threshold_for(position),
                tolerance=self.config.attention_position_tolerance,
                max_error=self.config.attention_max_error,
                verify_rows=self.config.attention_verify_rows,
                default_implementation=self.default_implementation,
                gate=self.gates[layer.name],
                keys=self.keys,
                reuse=self.reuse_counters,
                counters=self.context.counters,
                record_lookup=self.context.record_lookup,
                record_verdict=self.context.record_verdict,
            )
            self.hooks.set_attribute(module, MODULE_ATTR, cached)
        selection = ImplementationSelection(model, ATTN_IMPLEMENTATION)
        self.hooks.call("set_attn_implementation", selection.apply, selection.undo)

    def _attention_module(self, layer: CachedLayer) -> nn.Module:
        """The layer's self-attention: the first submodule dispatching through ``AttentionInterface`` (transformers
        layers run self-attention before cross-attention; later ones compute eagerly)."""
        model = self.context.model
        can_set = getattr(model, "_can_set_attn_implementation", None)
        found = [m for m in layer.module.modules() if dispatches_attention(m)]
        if not found or (can_set is not None and not can_set()):
            raise ValueError(
                f"strategy='attention' replaces the attention function through transformers' AttentionInterface, "
                f"but layer {layer.name!r} of {type(model).__name__} has no attention module that dispatches through "
                "it. Allowed: models whose attention calls ALL_ATTENTION_FUNCTIONS (BERT, RoBERTa, DistilBERT, GPT-2, "
                "Llama, Qwen2, Gemma3, ...); use strategy='exact' or 'semantic' for this one."
            )
        return found[0]

    # --- requests ---------------------------------------------------------------------------------------------------
    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:
        config = getattr(self.context.model, "config", None)
        scope.state[PREFILL] = past_length(find_cache(arguments)) == 0
        scope.state[WEIGHTS] = bool(arguments.get("output_attentions", getattr(config, "output_attentions", False)))
        scope.state[NAMESPACE_KEY] = namespace_tag(scope.namespace)

    # --- counters and report ----------------------------------------------------------------------------------------
    def reset_counters(self) -> None:
        self.reuse_counters.reset()
        for gate in self.gates.values():  # the reuse the gates measured went with the entries
            gate.reset()

    def report(self) -> dict[str, Any]:
        """``stats()["attention_gate"]``: per layer and length bucket, the gate's state and measurements."""
        return {"attention_gate": {name: gate.report() for name, gate in self.gates.items()}}

    @property
    def reuse(self) -> dict[str, int]:
        """Counters of the rows and columns hits recomputed, of the heads they computed exactly because their maps
        moved (failed verification), and of the rows an identical row of their batch served: ``hits``,
        ``recomputed``, ``length``, ``heads_recomputed``, ``heads``, ``duplicates``, ``corrected`` (reused rows whose
        stored output was corrected for changed columns)."""
        return self.reuse_counters.counts

    @property
    def recomputed_fraction(self) -> float:
        """Mean fraction of rows and columns hits recomputed (0: every hit reused its whole map)."""
        return self.reuse_counters.recomputed_fraction


def _heads(module: nn.Module) -> int:
    """The query heads of an attention module (0 when it does not say): what its bank's entries must have."""
    config = getattr(module, "config", None)
    for source, name in ((module, "num_heads"), (module, "num_attention_heads"), (config, "num_attention_heads")):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
    return 0
