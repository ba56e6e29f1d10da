"""The layer hook: hands each cached layer's call to its reuse step, and computes the rows the step asks for."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from ...kv import KVWrite, find_cache, record_kv_writes
from ...layers import same_rows, select_rows
from ...stats import CacheStats
from ..stack import LayerHook, StartRun
from .run import Compute, LayerSlot, SemanticRun

ReuseStep = Callable[[LayerSlot, SemanticRun, dict[str, Any], torch.Tensor, Compute], torch.Tensor]
"""``step(slot, run, arguments, hidden, compute)``: the layer's output for the whole batch, serving the rows it can
and computing the others through ``compute`` (``StateStep``, ``ResidualStep`` or :func:`compute_every_row`)."""


def compute_every_row(
    slot: LayerSlot, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, compute: Compute
) -> torch.Tensor:
    """The step of a layer that never looks up: the ``probe`` fingerprint's layers, which key the rows on what they
    compute and so must compute it."""
    return compute(list(range(run.batch)))[0]


class SemanticLayerHook(LayerHook):
    """The hook on one cached layer: gives its ``step`` the layer's slot and a ``compute`` bound to this call.

    What it serves is the step's business; the hook only runs the original layer, on a sub-batch when the step asks
    for some rows, keeping the counters and the output structure the base class serves in.
    """

    def __init__(self, slot: LayerSlot, start_run: StartRun, counters: CacheStats, step: ReuseStep):
        super().__init__(slot.layer, slot.position, start_run, counters)
        self.slot = slot
        self.step = step

    def forward_run(self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        compute = functools.partial(self.compute, run, arguments, hidden)
        return self.pack(self.step(self.slot, run, arguments, hidden, compute))

    def compute(
        self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, rows: list[int]
    ) -> tuple[torch.Tensor, list[KVWrite]]:
        """Run the layer on ``rows`` (a sub-batch unless that is all of them); return the full-batch hidden state,
        with the input kept in the other rows, and the K/V writes it made.

        A row repeating another row of ``rows`` with the same input here is not computed: it gets that row's output.
        """
        copies = self._copies(run, arguments, hidden, rows)
        if copies:
            full, writes = self.compute(run, arguments, hidden, [r for r in rows if r not in copies])
            for row, twin in copies.items():
                full[row] = full[twin]
            return full, writes
        start = time.perf_counter()
        if len(rows) == run.batch:
            with record_kv_writes(find_cache(arguments) if run.with_kv else None) as writes:
                out = self.original(**arguments)
        else:
            selected = torch.tensor(rows, device=hidden.device)
            out, writes = self.original(**select_rows(arguments, self.layer.spec, selected, run.batch)), []
        seconds = time.perf_counter() - start
        self.observe(out)
        computed = out[0] if isinstance(out, tuple) else out
        self.counters.record_compute(self.layer.name, len(rows), seconds)
        if len(rows) == run.batch:
            return computed, writes
        full = hidden.clone()
        full[torch.tensor(rows, device=hidden.device)] = computed.to(full.dtype)
        return full, writes

    def _copies(
        self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, rows: list[int]
    ) -> dict[int, int]:
        """The twins among ``rows`` whose row they repeat is computed too, from the same input: same hidden state
        (an earlier layer may have served one and not the other) and same per-row arguments."""
        if not run.twins:
            return {}
        computing = set(rows)
        return {
            row: twin
            for row, twin in run.twins.items()
            if row in computing and twin in computing and same_rows(arguments, hidden, self.layer.spec, row, twin)
        }
