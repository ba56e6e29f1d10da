"""One row's call: its reused states gathered at their new positions, the early-layer probe, the computed tokens run
after a cache of the kept ones, and the cache put back in position order.

The computed tokens (new segments, separators, the recomputed share, the last token) are one call of the model's own
forward with ``position_ids`` of their real positions and a 4-D mask that lets each see the kept tokens and computed
tokens at earlier positions only (what a full prefill's causal mask lets it see). The base model's output is spliced
to the row's full length (kept tokens' stored final states, computed tokens' fresh ones) before the head reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.utils import ModelOutput

from ...kv import cache_parameter, without_cache
from ...request import RequestScope, current_scope
from ..prefix.base_call import BaseModelCall
from .entry import SegmentShape
from .plan import RowPlan
from .rope import Rerotation

States = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Keys and values (layers, heads, n, dim) and final hidden states (n, hidden) of a row, zeros where not reused."""


_PROBING = "segment.probing"


class _Stop(Exception):
    """Ends the probe's forward after the probe layer."""


class RowBlend:
    """Computes one unpadded row (batch of 1) from its plan."""

    def __init__(
        self,
        base_model: nn.Module,
        shape: SegmentShape,
        layer_modules: list[nn.Module],
        base_call: BaseModelCall,
        probe_layer: int,
    ):
        self.base_model = base_model
        self.shape = shape
        self.layer_modules = layer_modules
        self.base_call = base_call
        self.probe_layer = min(probe_layer, len(layer_modules) - 1)
        self.rerotation = Rerotation(base_model)

    def gather(self, plan: RowPlan, dtype: torch.dtype, device: torch.device) -> States:
        """Every reused segment's stored states laid at its positions in this row, keys re-rotated to them."""
        n, shape = plan.length, self.shape
        keys = torch.zeros((shape.n_layers, shape.kv_heads, n, shape.head_dim), dtype=dtype, device=device)
        values, hidden = torch.zeros_like(keys), torch.zeros((n, shape.hidden_size), dtype=dtype, device=device)
        for i, entry in plan.entries.items():
            segment = plan.segments[i]
            where = slice(segment.start, segment.end)
            stored = entry.key.to(device=device, dtype=dtype)
            keys[:, :, where] = self.rerotation.rotate(stored, segment.start - int(entry.start))
            values[:, :, where] = entry.value.to(device=device, dtype=dtype)
            hidden[where] = entry.hidden.to(device=device, dtype=dtype)
        return keys, values, hidden

    @property
    def probe_module(self) -> nn.Module:
        """The layer after which a probe stops (:meth:`on_probe_layer` is attached to it once, by the strategy)."""
        return self.layer_modules[self.probe_layer]

    @staticmethod
    def on_probe_layer(module: nn.Module, args: Any, output: Any) -> None:
        """Ends the forward of this thread's probe, if one is running (other threads' calls go on)."""
        scope = current_scope()
        if scope is not None and scope.state.get(_PROBING):
            raise _Stop

    def probe(self, scope: RequestScope, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The row's fresh keys and values of layers ``0..probe_layer``, computed for all its tokens (exactly a full
        prefill's there); the forward stops after the probe layer."""
        cache = DynamicCache(config=self.base_model.config)
        arguments = {
            "input_ids": input_ids,
            "position_ids": torch.arange(input_ids.shape[1], device=input_ids.device)[None],
            cache_parameter(self.base_model.forward): cache,
            "use_cache": True,
        }

        scope.state[_PROBING] = True
        try:
            self.base_model(**arguments)
        except _Stop:
            pass
        finally:
            scope.state.pop(_PROBING, None)
        return [(layer.keys, layer.values) for layer in cache.layers[: self.probe_layer + 1]]

    @staticmethod
    def deviation(states: States, fresh: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(n,) per token: how far the stored states at the probe layer are from the fresh ones (L2 over heads)."""
        keys, values = fresh[-1]
        layer = len(fresh) - 1
        stored_k, stored_v = states[0][layer].to(keys.dtype), states[1][layer].to(values.dtype)
        dk = (keys[0] - stored_k).float().pow(2).sum(dim=(0, 2))
        dv = (values[0] - stored_v).float().pow(2).sum(dim=(0, 2))
        return (dk + dv).sqrt()

    def call(
        self,
        scope: RequestScope,
        forward: Callable[..., Any],
        arguments: dict[str, Any],
        plan: RowPlan,
        states: States,
        fresh: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> tuple[Any, DynamicCache, torch.Tensor]:
        """The row's output, its full cache in position order and its final hidden states (1, n, hidden)."""
        ids = arguments["input_ids"]
        device = ids.device
        kept = plan.kept()
        kept_at = kept.nonzero().flatten().to(device)
        computed_at = (~kept).nonzero().flatten().to(device)
        cache = DynamicCache(config=self.base_model.config)
        for i in range(self.shape.n_layers):
            keys, values = states[0][i], states[1][i]
            if fresh is not None and i < len(fresh):  # the probe computed these layers exactly
                keys, values = fresh[i][0][0], fresh[i][1][0]
            cache.update(keys[:, kept_at][None], values[:, kept_at][None], i)
        call = {k: v for k, v in without_cache(arguments).items() if k != "cache_position"}
        call[cache_parameter(forward)] = cache
        call["input_ids"] = ids[:, computed_at]
        call["position_ids"] = computed_at[None]
        call["attention_mask"] = _mask(kept_at, computed_at, states[2].dtype)
        call["use_cache"] = True
        full: list[torch.Tensor] = []

        def splice(output: Any) -> Any:
            hidden = states[2][None].to(output[0].dtype).clone()
            hidden[0, computed_at] = output[0][0]
            full.append(hidden)
            return replace_first(output, hidden)

        output = self.base_call.call(scope, forward, call, splice)
        order = torch.argsort(torch.cat([kept_at, computed_at]))
        for layer in cache.layers[: self.shape.n_layers]:
            layer.keys, layer.values = layer.keys[:, :, order], layer.values[:, :, order]
        return output, cache, full[0]


def _mask(kept_at: torch.Tensor, computed_at: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, computed, kept + computed) additive mask: a computed token sees every token at an earlier position and
    itself, wherever it sits in the cache."""
    dtype = dtype if dtype.is_floating_point else torch.float32
    positions = torch.cat([kept_at, computed_at])
    allowed = positions[None, :] <= computed_at[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def replace_first(output: Any, first: torch.Tensor) -> Any:
    """A model output with its first field (the hidden states) replaced."""
    if isinstance(output, ModelOutput):
        values = dict(output.items())
        values[next(iter(values))] = first
        return type(output)(**values)
    return (first, *output[1:])
