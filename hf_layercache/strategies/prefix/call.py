"""One call of a group of rows: the prefix cache it continues from, the suffix call, and the caller's layout after.

Row ``r`` of a group reuses its ``reused`` cached tokens, laid into the cache at ``[split - reused, split)``; the
model computes columns ``[split, L)`` of every row under the group's mask (:class:`~.layout.Group`); the base
model's output is spliced behind the cached final hidden states, and the cached states of moved rows are written
back to the caller's columns, so hidden states, logits and the returned cache all have the caller's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.utils import ModelOutput

from ...bank import CacheBank
from ...kv import find_cache, without_cache
from .block import BlockShape
from .layout import Group
from .rows import Row


@dataclass
class PrefixRun:
    """One group's prefill: its rows, where the computed rectangle starts, the cache it starts from, and what the
    base model's call produced."""

    rows: list[Row]
    group: Group
    cache: DynamicCache
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    """Gathered keys and values ``(layer, row, head, column, dim)`` and hidden states of columns ``[0, split)``."""
    keep_cache: bool
    moves: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    hidden: torch.Tensor | None = None
    """The base model's full-length final hidden states (caller's layout), once its call has returned."""

    @property
    def split(self) -> int:
        return self.group.split


class GroupCall:
    """The part of :class:`~.strategy.PrefixStrategy` that computes one group (a mixin: ``attach`` sets these)."""

    shape: BlockShape
    block_size: int
    bank: CacheBank
    owner: Any
    layers: list[Any]

    def _prepare(self, arguments: dict[str, Any], rows: list[Row], group: Group, dtype: torch.dtype) -> PrefixRun:
        """The cache the group's call continues from, filled with every row's reused prefix."""
        cache = find_cache(arguments)
        if cache is None:
            cache = DynamicCache(config=self.owner.config)
        use_cache = arguments.get("use_cache")
        keep_cache = bool(use_cache if use_cache is not None else getattr(self.owner.config, "use_cache", True))
        prefix = self._gather(rows, group, dtype) if group.split else None
        if prefix is not None:
            for i, layer in enumerate(self.layers):
                cache.update(prefix[0][i].to(layer.device), prefix[1][i].to(layer.device), i)
        return PrefixRun(rows, group, cache, prefix, keep_cache, group.moves(rows))

    def _gather(
        self, rows: list[Row], group: Group, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and hidden states of columns ``[0, split)``: row ``r``'s reused tokens end at ``split``,
        the columns before them are zeros (pads, hidden by the mask as uncached hides its pads). One copy per row
        of the row's blocks, concatenated: no work per block beyond listing them."""
        shape, split = self.shape, group.split
        options = {"dtype": dtype, "device": self.bank.device}
        if len(group.rows) == 1 and rows[group.rows[0]].reused == split:  # one row, no pads: its blocks as they are
            keys, values, hidden = (t.to(**options) for t in self._row_states(rows[group.rows[0]]))
            return keys[:, None], values[:, None], hidden[None]
        keys = torch.empty((shape.n_layers, len(group.rows), shape.kv_heads, split, shape.head_dim), **options)
        values = torch.empty_like(keys)
        hidden = torch.empty((len(group.rows), split, shape.hidden_size), **options)
        for i, r in enumerate(group.rows):
            row = rows[r]
            start = split - row.reused
            keys[:, i, :, :start], values[:, i, :, :start], hidden[i, :start] = 0, 0, 0
            if row.reused:
                keys[:, i, :, start:], values[:, i, :, start:], hidden[i, start:] = self._row_states(row)
        return keys, values, hidden

    def _row_states(self, row: Row) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A row's reused keys, values ``(layer, head, token, dim)`` and hidden states, one copy each."""
        entries = row.entries[: -(-row.reused // self.block_size)]
        n = row.reused
        keys = torch.cat([e.key for e in entries], dim=2)[:, :, :n]
        values = torch.cat([e.value for e in entries], dim=2)[:, :, :n]
        return keys, values, torch.cat([e.hidden for e in entries])[:n]

    @staticmethod
    def _suffix_arguments(arguments: dict[str, Any], run: PrefixRun, cache_name: str) -> dict[str, Any]:
        """The call for the rectangle, continuing from the prefix cache (under the name ``forward`` uses)."""
        suffix = without_cache(arguments)
        suffix[cache_name] = run.cache
        ids = arguments["input_ids"]
        suffix["input_ids"] = ids[:, run.split :]
        if run.moves is not None:
            suffix["attention_mask"] = run.group.mask(run.rows, arguments.get("attention_mask"), ids)
        positions = arguments.get("position_ids")
        if positions is not None:
            suffix["position_ids"] = positions[..., run.split :]
        elif run.moves is not None:  # unpadded rows: a token's position is its column
            suffix["position_ids"] = torch.arange(run.split, ids.shape[1], device=ids.device).expand(len(ids), -1)
        return suffix

    def _splice(self, output: Any, run: PrefixRun) -> Any:
        """The base model's output with the cached prefix states in front of the computed rectangle, each row's in
        its own columns."""
        suffix = output[0]
        full = suffix
        if run.prefix is not None:
            prefix = run.prefix[2].to(device=suffix.device, dtype=suffix.dtype)
            full = torch.cat([prefix, suffix], dim=1)
            if run.moves is not None:
                rows, source, target = (index.to(suffix.device) for index in run.moves)
                full[rows, target] = prefix[rows, source]
        run.hidden = full
        if isinstance(output, ModelOutput):
            values = dict(output.items())
            values[next(iter(values))] = full
            if not run.keep_cache:  # uncached, use_cache=False returns no cache
                values = {k: v for k, v in values.items() if v is not run.cache}
            return type(output)(**values)
        return (full, *(x for x in output[1:] if run.keep_cache or x is not run.cache))

    def _restore(self, run: PrefixRun) -> None:
        """Moved rows' cached states back to the caller's columns in every layer of the returned cache."""
        if run.moves is None or run.prefix is None:
            return
        for i, layer in enumerate(run.cache.layers[: self.shape.n_layers]):
            rows, source, target = (index.to(layer.keys.device) for index in run.moves)
            layer.keys[rows, :, target] = run.prefix[0][i][rows, :, source].to(layer.keys.device)
            layer.values[rows, :, target] = run.prefix[1][i][rows, :, source].to(layer.values.device)


def group_arguments(arguments: dict[str, Any], rows: torch.Tensor, batch: int) -> dict[str, Any]:
    """The call's arguments for some of its rows (the KV cache left out: each group fills its own)."""
    out = without_cache(arguments)
    for name, value in out.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            out[name] = value.index_select(0, rows.to(value.device))
    return out


def merge_outputs(outputs: list[Any], runs: list[PrefixRun], order: torch.Tensor, cache: Any) -> Any:
    """The groups' outputs as the one output of the whole batch: per-row tensors concatenated back into the
    caller's row order, the groups' caches replaced by the batch's ``cache`` (``None``: left out)."""

    def merged(values: list[Any]) -> Any:
        first = values[0]
        if any(v is run.cache for v, run in zip(values, runs, strict=True)):
            return cache
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            return torch.cat(values).index_select(0, order.to(first.device))
        return first

    if isinstance(outputs[0], ModelOutput):
        fields = {k: merged([o[k] for o in outputs]) for k in outputs[0]}
        return type(outputs[0])(**{k: v for k, v in fields.items() if v is not None})
    return tuple(x for x in (merged(list(parts)) for parts in zip(*outputs, strict=True)) if x is not None)


def merge_caches(runs: list[PrefixRun], order: torch.Tensor, cache: Any, config: Any, n_layers: int) -> Any:
    """The batch's KV cache: the groups' caches concatenated back into the caller's row order."""
    cache = cache if cache is not None else DynamicCache(config=config)
    for i in range(n_layers):
        keys = [run.cache.layers[i].keys for run in runs]
        values = [run.cache.layers[i].values for run in runs]
        index = order.to(keys[0].device)
        cache.update(torch.cat(keys).index_select(0, index), torch.cat(values).index_select(0, index), i)
    return cache
