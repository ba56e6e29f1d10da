"""The calls of a request's groups: the prefix cache each continues from, the suffix call, the caller's layout after,
and the groups' outputs merged back into the batch's.

Row ``r`` of a group reuses its ``reused`` cached tokens, laid into the cache at ``[split - reused, split)``; the
model computes columns ``[split, L)`` of every row under the group's mask (:func:`~.layout.call_mask`); the base
model's output is spliced behind the cached final hidden states (through :class:`~.base_call.BaseModelCall`, the one
route to it), and the cached states of moved rows are written back to the caller's columns, so hidden states,
logits and the returned cache all have the caller's layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.utils import ModelOutput

from ...bank import CacheBank
from ...kv import cache_parameter, find_cache, without_cache
from ...request import RequestScope
from .base_call import BaseModelCall
from .block import BlockShape
from .layout import call_mask, moves
from .run import Group, PrefixRun, Row
from .store import BlockStore


class GroupCall:
    """Computes the groups of a request (:func:`~.layout.plan`): :meth:`prepare` gathers every group's prefix,
    :meth:`run` computes one group and stores its new blocks, :meth:`merge` puts several groups' outputs back into
    the caller's row order."""

    def __init__(
        self,
        bank: CacheBank,
        shape: BlockShape,
        base_model: nn.Module,
        model: nn.Module,
        devices: list[torch.device],
        base_call: BaseModelCall,
        store: BlockStore,
    ):
        self.bank = bank
        self.shape = shape
        self.base_model = base_model
        """The model owning the layer stack: its config builds the caches."""
        self.model = model
        """The cached model: the prefix is gathered in its dtype."""
        self.devices = devices
        """Per layer, the device its cache states live on."""
        self.base_call = base_call
        self.store = store

    def prepare(self, arguments: dict[str, Any], rows: list[Row], groups: list[Group]) -> list[PrefixRun] | None:
        """Every group's run, each prefix gathered before any group stores (a store may evict a block another group
        reuses, and hand its slot to a new one); ``None`` when a looked-up block is no longer the bank's."""
        batch = len(rows)
        calls = (
            [arguments]
            if covers_batch(groups, batch)
            else [_group_arguments(arguments, torch.tensor(group.rows), batch) for group in groups]
        )
        dtype = self.model.dtype
        with self.bank.lock:
            for row in rows:
                used = zip(row.used(self.shape.block_size), row.entries, strict=False)
                if not all(self.bank.holds(entry_id, "key", block.key) for entry_id, block in used):
                    return None
            return [self._prepare(call, rows, group, dtype) for call, group in zip(calls, groups, strict=True)]

    def run(self, scope: RequestScope, forward: Callable[..., Any], run: PrefixRun, namespace: int) -> Any:
        """One group's call: the suffix computed after the prefix cache, the base model's output spliced behind the
        prefix, the caller's layout restored, and the group's new blocks stored."""
        suffix = _suffix_arguments(run, cache_parameter(forward))
        start = time.perf_counter()
        output = self.base_call.call(scope, forward, suffix, lambda base_output: _splice(base_output, run))
        seconds = time.perf_counter() - start
        if run.hidden is None:
            raise RuntimeError(
                f"prefix strategy: {type(self.base_model).__name__} was not called; outputs would be short."
            )
        self._restore(run)
        computed = sum(run.rows[r].length - run.rows[r].reused for r in run.group.rows)
        self.store.store(run, namespace, seconds / max(computed, 1))
        return output

    def merge(self, arguments: dict[str, Any], outputs: list[Any], runs: list[PrefixRun], sources: list[int]) -> Any:
        """The groups' outputs and caches as the batch's, rows in the caller's order (a row that repeats another,
        ``sources``, gets a copy of that row's)."""
        order = gather_index(runs, sources)
        cache = None
        if runs[0].keep_cache:
            cache = _merge_caches(runs, order, find_cache(arguments), self.base_model.config, self.shape.n_layers)
        return _merge_outputs(outputs, runs, order, cache)

    def _prepare(self, arguments: dict[str, Any], rows: list[Row], group: Group, dtype: torch.dtype) -> PrefixRun:
        """The cache the group's call continues from, filled with every row's reused prefix."""
        cache = find_cache(arguments)
        if cache is None:
            cache = DynamicCache(config=self.base_model.config)
        use_cache = arguments.get("use_cache")
        keep_cache = bool(use_cache if use_cache is not None else getattr(self.base_model.config, "use_cache", True))
        prefix = self._gather(rows, group, dtype) if group.split else None
        if prefix is not None:
            for i, device in enumerate(self.devices):
                cache.update(prefix[0][i].to(device), prefix[1][i].to(device), i)
        return PrefixRun(arguments, rows, group, cache, prefix, keep_cache, moves(group, rows))

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
        entries = row.entries[: -(-row.reused // self.shape.block_size)]
        n = row.reused
        keys = torch.cat([e.key for e in entries], dim=2)[:, :, :n]
        values = torch.cat([e.value for e in entries], dim=2)[:, :, :n]
        return keys, values, torch.cat([e.hidden for e in entries])[:n]

    def _restore(self, run: PrefixRun) -> None:
        """Moved rows' cached states back to the caller's columns in every layer of the returned cache."""
        if run.moves is None or run.prefix is None:
            return
        for i, layer in enumerate(run.cache.layers[: self.shape.n_layers]):
            rows, source, target = (index.to(layer.keys.device) for index in run.moves)
            layer.keys[rows, :, target] = run.prefix[0][i][rows, :, source].to(layer.keys.device)
            layer.values[rows, :, target] = run.prefix[1][i][rows, :, source].to(layer.values.device)


def covers_batch(groups: list[Group], batch: int) -> bool:
    """Whether one group computes every row of the batch (no other group, no repeated row left out)."""
    return len(groups) == 1 and len(groups[0].rows) == batch


def gather_index(runs: list[PrefixRun], sources: list[int]) -> torch.Tensor:
    """Per caller row, its place among the groups' rows concatenated (the place of the row it repeats)."""
    place = {r: i for i, r in enumerate(r for run in runs for r in run.group.rows)}
    return torch.tensor([place[source] for source in sources])


def batch_hidden(runs: list[PrefixRun], sources: list[int]) -> torch.Tensor:
    """The base model's final hidden states of every caller row, in the caller's row order and layout."""
    if covers_batch([run.group for run in runs], len(sources)):
        return runs[0].hidden
    hidden = torch.cat([run.hidden for run in runs])
    return hidden.index_select(0, gather_index(runs, sources).to(hidden.device))


def _suffix_arguments(run: PrefixRun, cache_name: str) -> dict[str, Any]:
    """The call for the rectangle, continuing from the prefix cache (under the name ``forward`` uses)."""
    arguments = run.arguments
    suffix = without_cache(arguments)
    suffix[cache_name] = run.cache
    ids = arguments["input_ids"]
    suffix["input_ids"] = ids[:, run.split :]
    if run.moves is not None:
        suffix["attention_mask"] = call_mask(run.group, run.rows, arguments.get("attention_mask"), ids)
    positions = arguments.get("position_ids")
    if positions is not None:
        suffix["position_ids"] = positions[..., run.split :]
    elif run.moves is not None:  # unpadded rows: a token's position is its column
        suffix["position_ids"] = torch.arange(run.split, ids.shape[1], device=ids.device).expand(len(ids), -1)
    return suffix


def _splice(output: Any, run: PrefixRun) -> Any:
    """The base model's output with the cached prefix states in front of the computed rectangle, each row's in its
    own columns (kept as :attr:`~.run.PrefixRun.hidden` for storing)."""
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


def _group_arguments(arguments: dict[str, Any], rows: torch.Tensor, batch: int) -> dict[str, Any]:
    """The call's arguments for some of its rows (the KV cache left out: each group fills its own)."""
    out = without_cache(arguments)
    for name, value in out.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            out[name] = value.index_select(0, rows.to(value.device))
    return out


def _merge_outputs(outputs: list[Any], runs: list[PrefixRun], order: torch.Tensor, cache: Any) -> Any:
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


def _merge_caches(runs: list[PrefixRun], order: torch.Tensor, cache: Any, config: Any, n_layers: int) -> Any:
    """The batch's KV cache: the groups' caches concatenated back into the caller's row order."""
    cache = cache if cache is not None else DynamicCache(config=config)
    for i in range(n_layers):
        keys = [run.cache.layers[i].keys for run in runs]
        values = [run.cache.layers[i].values for run in runs]
        index = order.to(keys[0].device)
        cache.update(torch.cat(keys).index_select(0, index), torch.cat(values).index_select(0, index), i)
    return cache
