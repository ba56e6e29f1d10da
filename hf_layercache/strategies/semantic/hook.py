"""The layer hook: routes each cached layer's call to the probe, residual reuse or state reuse, and computes rows."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import torch

from ...kv import KVWrite, find_cache, record_kv_writes
from ...layers import CachedLayer, select_rows
from ..stack import LayerHook
from .run import LayerSlot, SemanticRun

if TYPE_CHECKING:
    from .strategy import SemanticStrategy


class SemanticLayerHook(LayerHook):
    def __init__(self, strategy: SemanticStrategy, layer: CachedLayer, position: int, rank: int):
        super().__init__(layer, position, strategy.start_run, strategy.context.counters)
        self.strategy = strategy
        self.slot = LayerSlot(layer, position, rank)

    def forward_run(self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        compute = functools.partial(self.compute, run, arguments, hidden)
        if self.position < self.strategy.fingerprint.after_layers:  # the probe's layers always compute
            return self.pack(compute(list(range(run.batch)))[0])
        step = self.strategy.residual_step if self.strategy.reuse == "residual" else self.strategy.state_step
        return self.pack(step(self.slot, run, arguments, hidden, compute))

    def compute(
        self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, rows: list[int]
    ) -> tuple[torch.Tensor, list[KVWrite]]:
        """Run the layer on ``rows`` (a sub-batch unless that is all of them); return the full-batch hidden state,
        with the input kept in the other rows, and the K/V writes it made."""
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
