"""Residual reuse (``reuse="residual"``): a hit adds an earlier input's layer update to the row's own state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...kv import find_cache, replay_kv_writes
from .alignment import on_device
from .run import SemanticRun

if TYPE_CHECKING:
    from ...controller import LayerCacheController
    from .hook import SemanticLayerHook


class ResidualReuse:
    """The part of :class:`~.strategy.SemanticStrategy` that serves ``reuse="residual"``, layer by layer.

    A mixin: it uses the strategy's search (:mod:`.search`), verification and storing.
    """

    controller: LayerCacheController

    # --- residual reuse -------------------------------------------------------------------------------------------
    def residual_step(
        self, hook: SemanticLayerHook, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> torch.Tensor:
        """Serve ``hidden + cached update`` to rows with a similar entry; compute (and store) the others."""
        keys = self.key(run, hidden)
        found, _ = self.find(hook, run, keys, list(range(run.batch)), "delta")
        candidates = self._choose(hook, run, arguments, found)
        self._record_lookups(hook, run, candidates)
        served = {r: c for r, c in candidates.items() if not c.verify}
        compute_rows = [r for r in range(run.batch) if r not in served]
        if compute_rows:
            out, writes = hook.compute(run, arguments, hidden, compute_rows)
            # judged before storing: a stored row replaces the entry of the same input, and takes its observations
            self._check(hook, run, {r: c for r, c in candidates.items() if c.verify}, hidden, out, "delta")
            self._store(hook, run, keys, out, hidden, compute_rows, writes, "delta")
        else:
            out = hidden.clone()
        for row, candidate in served.items():
            pos = on_device(run.positions[row], hidden.device)
            delta = candidate.values["delta"].to(device=hidden.device, dtype=hidden.dtype)
            out[row, pos] = hidden[row, pos] + delta[on_device(candidate.index, delta.device)]
            run.exact[row] = False
        if run.with_kv and served:  # all rows are served together (see _choose)
            entries = [served[r].values for r in range(run.batch)]
            replay_kv_writes(find_cache(arguments), self._batch_writes(run, entries))
        self.controller.stats_.record(hook.layer.name, hits=len(served))
        return out
