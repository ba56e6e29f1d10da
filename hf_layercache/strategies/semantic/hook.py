"""The layer hook: routes each cached layer's call to the probe, residual reuse or state reuse, and computes rows."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from ...kv import KVWrite, find_cache, record_kv_writes
from ...layers import CachedLayer, select_rows
from ..base import LayerHook
from .run import SemanticRun

if TYPE_CHECKING:
    from .strategy import SemanticStrategy


class SemanticLayerHook(LayerHook):
    def __init__(self, strategy: SemanticStrategy, layer: CachedLayer, position: int, rank: int):
        super().__init__(strategy, layer, position)
        self.rank = rank
        """Index among all cached layers (for ``threshold_for``)."""

    def forward_run(self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        if self.position < self.strategy.fingerprint.after_layers:  # the probe's layers always compute
            return self.pack(self.compute(run, arguments, hidden, list(range(run.batch)))[0])
        if self.strategy.reuse == "residual":
            out = self.strategy.residual_step(self, run, arguments, hidden)
        else:
            out = self.strategy.state_step(self, run, arguments, hidden)
        return self.pack(out)

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
        self.strategy.controller.stats_.record(self.layer.name, misses=len(rows), compute_seconds=seconds)
        if len(rows) == run.batch:
            return computed, writes
        full = hidden.clone()
        full[torch.tensor(rows, device=hidden.device)] = computed.to(full.dtype)
        return full, writes
