"""The exact layer hook: serves a stack's hit rows and computes its missed ones."""

from __future__ import annotations

import time
from typing import Any

import torch

from ...kv import find_cache, place_writes, record_kv_writes, replay_kv_writes
from ...layers import CachedLayer, select_rows
from ...stats import CacheStats
from ..stack import LayerHook, StartRun
from .run import StackRun
from .store import RowStore


class ExactLayerHook(LayerHook):
    """Serves a stack's hit rows (the last cached layer returns their stored outputs, the others pass them through)
    and computes its missed rows (the last cached layer hands them to the ``store``)."""

    def __init__(
        self,
        layer: CachedLayer,
        position: int,
        last: bool,
        start_run: StartRun,
        counters: CacheStats,
        store: RowStore,
    ):
        super().__init__(layer, position, start_run, counters)
        self.last = last
        self.store = store

    def forward_run(self, run: StackRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        if not run.misses:
            return self._serve(run, arguments, hidden)
        if run.hits or run.twins:
            return self._compute_missed_rows(run, arguments, hidden)
        return self._compute_all(run, arguments, hidden)

    # --- the three cases ------------------------------------------------------------------------------------------
    def _serve(self, run: StackRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        if run.with_kv:
            rows = [run.hits[r].writes.get(self.position, []) for r in range(run.batch)]
            # per row: a free row stored its real tokens' K/V, a layout-bound one (holes in its mask) its whole row
            columns = [key.columns if key.free else None for key in run.keys]
            replay_kv_writes(find_cache(arguments), place_writes(rows, columns, hidden.shape[1]) if rows[0] else [])
        out = self._cached_hidden(run, range(run.batch), hidden) if self.last else hidden
        return self.pack(out)

    def _compute_all(self, run: StackRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        start = time.perf_counter()
        if run.with_kv:
            with record_kv_writes(find_cache(arguments)) as writes:
                out = self.original(**arguments)
            run.writes[self.position] = writes
        else:
            out = self.original(**arguments)
        self._computed(run, run.batch, time.perf_counter() - start, out)
        if self.last:
            self.store.store(run, self.layer, out[0] if isinstance(out, tuple) else out, run.misses)
        return out

    def _compute_missed_rows(self, run: StackRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        missed = torch.tensor(run.misses, device=hidden.device)
        start = time.perf_counter()
        out = self.original(**select_rows(arguments, self.layer.spec, missed, run.batch))
        self._computed(run, len(run.misses), time.perf_counter() - start, out)
        computed = out[0] if isinstance(out, tuple) else out
        full = hidden.clone()
        full[missed] = computed.to(full.dtype)
        if self.last:
            hit_rows = sorted(run.hits)
            if hit_rows:
                full[torch.tensor(hit_rows, device=hidden.device)] = self._cached_hidden(run, hit_rows, hidden)
            for row, twin in run.twins.items():
                full[row] = full[twin]
            self.store.store(run, self.layer, computed, list(range(len(run.misses))), rows=run.misses)
        if not isinstance(out, tuple):
            return full
        return (full, *(self._scatter(x, missed, run.batch) for x in out[1:]))

    # --- helpers --------------------------------------------------------------------------------------------------
    def _computed(self, run: StackRun, rows: int, seconds: float, out: Any) -> None:
        self.observe(out)
        run.seconds_per_row += seconds / rows
        self.counters.record_compute(self.layer.name, rows, seconds)

    def _cached_hidden(self, run: StackRun, rows, like: torch.Tensor) -> torch.Tensor:
        """The stored outputs of hit ``rows`` in this batch's layout: as stored where the layout is the one they
        were computed in; else their real tokens at the row's real columns and zeros at its pads (what pads hold
        depends on the batch; masks and poolers ignore them)."""
        out = like.new_zeros((len(rows), *like.shape[1:]))
        for i, row in enumerate(rows):
            entry, key = run.hits[row], run.keys[row]
            if entry.layout == key.layout:
                out[i] = entry.hidden.to(device=like.device, dtype=like.dtype)
            else:
                out[i, key.columns] = entry.hidden[entry.real].to(device=like.device, dtype=like.dtype)
        return out

    @staticmethod
    def _scatter(x: Any, missed: torch.Tensor, batch: int) -> Any:
        """Extra outputs of a sub-batch (T5's position bias) widened back to the whole batch."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(missed) or x.shape[0] == batch:
            return x
        full = x.new_zeros((batch, *x.shape[1:]))
        full[missed] = x
        return full
