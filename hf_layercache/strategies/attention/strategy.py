"""The ``attention`` strategy: registration, wiring into the model through its hook registry (the attention
function, each cached module's :class:`~.engine.CachedAttention`, the attention implementation), per-request state,
lookup keys, reuse counters and the checks of entries read from disk."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ...kv import find_cache, past_length
from ...layers import CachedLayer
from ...models import dispatches_attention
from ...registry import register_strategy
from ...request import RequestScope, namespace_tag
from ..base import Strategy
from .config import AttentionConfig
from .engine import _NAMESPACE, _PATTERNS, _PREFILL, CachedAttention
from .entry import AttentionEntry
from .function import _MODULE_ATTR, ATTN_IMPLEMENTATION, WEIGHTS, _register_functions, _unregister_functions
from .positions import _Pattern

_PROJECTION_SEED = 0x5EED


def _attention_configs(model: nn.Module) -> list[Any]:
    """Every config whose ``_attn_implementation`` ``set_attn_implementation`` may change (sub-configs included)."""
    seen: dict[int, Any] = {}
    pending = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        pending += [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None)]
    return list(seen.values())


@register_strategy("attention")
class AttentionStrategy(Strategy):
    """Approximate: similar requests reuse earlier softmax attention maps and compute only ``A @ V`` (prefill)."""

    serves_attention_maps = True
    config_class = AttentionConfig

    def __init__(self, context):
        super().__init__(context)
        self.max_error = self.config.attention_max_error
        self._pools: dict[tuple, torch.Tensor] = {}
        self._projections: dict[tuple, torch.Tensor] = {}
        self._heads: dict[str, int] = {}
        self._lock = threading.Lock()
        self.cached: dict[str, CachedAttention] = {}
        self.default_implementation = "eager"
        """The attention implementation the model had before ``enable()``: what runs where the cache does not."""
        self.reset_counters()

    # --- wiring -----------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        model = self.context.model
        modules = [self._attention_module(layer) for layer in self.layers]
        self.default_implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        self.hooks.call(f"AttentionInterface[{ATTN_IMPLEMENTATION!r}]", _register_functions, _unregister_functions)
        for position, (layer, module) in enumerate(zip(self.layers, modules, strict=True)):
            heads = _heads(module)
            bank = self.new_bank(
                layer.name,
                layer.device,
                len(self.layers),
                AttentionEntry,
                expected={"heads": heads},
                key_dim=self.config.attention_key_dim,
            )
            self._heads[layer.name] = heads
            cached = CachedAttention(self, layer, bank, self.config.threshold_for(position))
            self.cached[layer.name] = cached
            self.hooks.set_attribute(module, _MODULE_ATTR, cached)
        for config in _attention_configs(model):  # what set_attn_implementation changes, restored on removal
            self.hooks.set_attribute(config, "_attn_implementation_internal", config._attn_implementation_internal)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)

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

    def patterns(self, scope: RequestScope, keep: torch.Tensor) -> list[_Pattern]:
        """Per batch row, the :class:`_Pattern` of ``keep`` (batch, 1, L, L), cached for the request: the model
        passes the same mask tensor to every layer."""
        cache = scope.state.setdefault(_PATTERNS, {})
        signature = (keep.data_ptr(), tuple(keep.shape), keep.stride())
        if signature not in cache:
            cache[signature] = [_Pattern.of(keep[b, 0]) for b in range(keep.shape[0])]
        return cache[signature]

    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:
        config = getattr(self.context.model, "config", None)
        scope.state[_PREFILL] = past_length(find_cache(arguments)) == 0
        scope.state[WEIGHTS] = bool(arguments.get("output_attentions", getattr(config, "output_attentions", False)))
        scope.state[_NAMESPACE] = namespace_tag(scope.namespace)

    # --- keys -------------------------------------------------------------------------------------------------------
    def lookup_keys(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """(batch, attention_key_dim) float32 keys: query and key states mean-pooled over position segments, then
        projected by a fixed-seed Gaussian matrix (the same in every process, so saved keys stay valid)."""
        length = query.shape[-2]
        pool = self._pool(length, query.device, query.dtype)
        pooled = torch.cat([torch.matmul(pool, query), torch.matmul(pool, key)], dim=1).flatten(1)
        return torch.matmul(pooled, self._projection(pooled.shape[1], query.device, query.dtype)).float()

    def _pool(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(segments, length) matrix averaging contiguous runs of positions."""
        cache_key = (length, device, dtype)
        if cache_key not in self._pools:
            segments = min(self.config.attention_key_segments, length)
            owner = torch.arange(length) * segments // length
            pool = nn.functional.one_hot(owner, segments).T.to(torch.float32)
            self._pools[cache_key] = (pool / pool.sum(-1, keepdim=True)).to(device=device, dtype=dtype)
        return self._pools[cache_key]

    def _projection(self, in_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        cache_key = (in_dim, device, dtype)
        if cache_key not in self._projections:
            generator = torch.Generator().manual_seed(_PROJECTION_SEED)
            matrix = torch.randn(in_dim, self.config.attention_key_dim, generator=generator)
            self._projections[cache_key] = (matrix / in_dim**0.5).to(device=device, dtype=dtype)
        return self._projections[cache_key]

    def verify_rows(self, candidates: torch.Tensor) -> torch.Tensor | None:
        """Up to ``attention_verify_rows`` evenly spaced positions of ``candidates`` (the last included), recomputed
        to check a hit; ``None`` when verification is off or there is nothing to check."""
        count = min(self.config.attention_verify_rows, candidates.numel())
        if count == 0:
            return None
        picks = torch.linspace(candidates.numel() - 1, 0, count, device=candidates.device).round().long()
        return candidates[picks.flip(0)]

    def reset_counters(self) -> None:
        self.reuse = {"hits": 0, "recomputed": 0, "length": 0, "heads_recomputed": 0, "heads": 0}
        """Counters of the rows and columns hits recomputed, for :attr:`recomputed_fraction`, and of the heads they
        computed exactly because their maps moved (failed verification)."""
        for cached in self.cached.values():  # the reuse the gates measured went with the entries
            cached.gate.reset()

    def count_reuse(self, recomputed: int, length: int, heads: torch.Tensor | None, n_heads: int) -> None:
        """Record one hit that recomputed ``recomputed`` of ``length`` rows and columns, and ``heads`` of
        ``n_heads`` heads."""
        with self._lock:
            self.reuse["hits"] += 1
            self.reuse["recomputed"] += recomputed
            self.reuse["length"] += length
            self.reuse["heads_recomputed"] += 0 if heads is None else len(heads)
            self.reuse["heads"] += n_heads

    def report(self) -> dict[str, Any]:
        """``stats()["attention_gate"]``: per layer and length bucket, the gate's state and measurements."""
        return {"attention_gate": {name: cached.gate.report() for name, cached in self.cached.items()}}

    @property
    def recomputed_fraction(self) -> float:
        """Mean fraction of rows and columns hits recomputed (0: every hit reused its whole map)."""
        return self.reuse["recomputed"] / self.reuse["length"] if self.reuse["length"] else 0.0


def _heads(module: nn.Module) -> int:
    config = getattr(module, "config", None)
    for source, name in ((module, "num_heads"), (module, "num_attention_heads"), (config, "num_attention_heads")):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
    return 0
