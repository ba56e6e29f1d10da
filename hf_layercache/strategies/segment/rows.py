"""A request's rows as the segment strategy sees them: which are one unpadded run of tokens it can blend, and how the
outputs of rows computed one by one become the batch's output in the caller's layout."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.utils import ModelOutput

from ...kv import CACHE_ARGUMENTS, find_cache

HANDLED = frozenset({"input_ids", "attention_mask", "position_ids", "logits_to_keep", "use_cache", *CACHE_ARGUMENTS})
"""Arguments the strategy understands; a call with any other tensor argument is computed whole."""


def servable(arguments: dict[str, Any]) -> bool:
    """Whether the call is a prefill the strategy can split into rows: ``input_ids`` of real width, no other input
    tensors (``inputs_embeds``, ``labels``...), an empty (or no) ``DynamicCache``, a 2-D mask, an integer
    ``logits_to_keep``. Decode steps (a filled cache) pass through."""
    ids = arguments.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        return False
    if any(_is_data(v) for k, v in arguments.items() if k not in HANDLED):
        return False
    cache = find_cache(arguments)
    if cache is not None and not (
        isinstance(cache, DynamicCache)
        and cache.get_seq_length() == 0
        and all(type(layer) is DynamicLayer for layer in cache.layers)
    ):
        return False
    mask, keep = arguments.get("attention_mask"), arguments.get("logits_to_keep", 0)
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        return False
    return isinstance(keep, int)


def real_tokens(arguments: dict[str, Any], row: int) -> torch.Tensor | None:
    """The row's real tokens when they are one run ending at the last column at positions ``0..n-1`` (no padding,
    or left padding as ``generate`` sends): the rows the strategy blends. ``None``: the row is computed whole."""
    ids = arguments["input_ids"][row].detach().cpu()
    mask = arguments.get("attention_mask")
    mask = mask[row].detach().cpu() if mask is not None else torch.ones_like(ids)
    real = mask.nonzero().flatten()
    if real.numel() == 0 or not bool((mask[real] == 1).all()):
        return None
    first, n = int(real[0]), real.numel()
    if first + n != len(ids):
        return None  # a hole or right padding
    positions = arguments.get("position_ids")
    if positions is not None:
        own = positions.detach().cpu().expand(len(arguments["input_ids"]), -1)[row, first:]
        if not torch.equal(own, torch.arange(n, dtype=own.dtype)):
            return None
    return ids[first:]


def row_arguments(arguments: dict[str, Any], row: int) -> dict[str, Any]:
    """The call's arguments for one row as sent (its padding kept; the KV cache left out: the row fills its own)."""
    batch = arguments["input_ids"].shape[0]
    out = {k: v for k, v in arguments.items() if k not in CACHE_ARGUMENTS}
    for name, value in out.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            out[name] = value[row : row + 1]
    return out


def merge(outputs: list[Any], caches: list[DynamicCache | None], width: int, cache: Any, config: Any) -> Any:
    """Rows computed one by one as the batch's output: every per-row tensor left-padded with zeros to the widest
    (blended rows are their real tokens only, which end at the last column), the caches likewise to ``width``
    columns, into the caller's ``cache`` (or a new one)."""
    merged_cache = None
    if all(c is not None for c in caches):
        merged_cache = cache if cache is not None else DynamicCache(config=config)
        for i in range(len(caches[0].layers)):
            keys = _left_pad([c.layers[i].keys for c in caches], width, dim=2)
            values = _left_pad([c.layers[i].values for c in caches], width, dim=2)
            merged_cache.update(keys, values, i)

    def field(values: list[Any]) -> Any:
        if any(v is c for v, c in zip(values, caches, strict=True)) or isinstance(values[0], DynamicCache):
            return merged_cache
        if isinstance(values[0], torch.Tensor) and values[0].dim() >= 2:
            return _left_pad(values, max(v.shape[1] for v in values), dim=1)
        return values[0]

    if isinstance(outputs[0], ModelOutput):
        fields = {k: field([o[k] for o in outputs]) for k in outputs[0]}
        return type(outputs[0])(**{k: v for k, v in fields.items() if v is not None})
    return tuple(x for x in (field(list(parts)) for parts in zip(*outputs, strict=True)) if x is not None)


def _left_pad(tensors: list[torch.Tensor], width: int, dim: int) -> torch.Tensor:
    padded = []
    for t in tensors:
        missing = width - t.shape[dim]
        if missing:
            shape = list(t.shape)
            shape[dim] = missing
            t = torch.cat([t.new_zeros(shape), t], dim=dim)
        padded.append(t)
    return torch.cat(padded)


def _is_data(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (value is not None and hasattr(value, "get_seq_length"))
