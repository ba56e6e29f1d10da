"""Residual reuse (``reuse="residual"``): a hit adds an earlier input's layer update to the row's own state."""

from __future__ import annotations

from typing import Any

import torch

from ...kv import find_cache, replay_kv_writes
from .alignment import on_device
from .run import Compute, LayerSlot, SemanticRun


class ResidualReuse:
    """The part of :class:`~.strategy.SemanticStrategy` that serves ``reuse="residual"``, layer by layer.

    A mixin: it uses the strategy's search (:mod:`.search`), verification and storing.
    """

    # --- residual reuse -------------------------------------------------------------------------------------------
    def residual_step(
        self, slot: LayerSlot, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, compute: Compute
    ) -> torch.Tensor:
        """Serve ``hidden + cached update`` to rows with a similar entry; compute (and store) the others."""
        keys = self.key(run, hidden)
        found, _ = self.find(slot, run, keys, list(range(run.batch)), "delta")
        candidates = self._choose(slot, run, arguments, found)
        served = {r: c for r, c in candidates.items() if not c.verify}
        self._record_lookup(slot, run, served)
        compute_rows = [r for r in range(run.batch) if r not in served]
        if compute_rows:
            out, writes = compute(compute_rows)
            # judged before storing: a stored row replaces the entry of the same input, and takes its observations
            self._check(slot, run, {r: c for r, c in candidates.items() if c.verify}, hidden, out)
            self._store(slot, run, keys, out, hidden, compute_rows, writes, "delta")
        else:
            out = hidden.clone()
        for row, candidate in served.items():
            pos = on_device(run.positions[row], hidden.device)
            delta = candidate.entry.value.to(device=hidden.device, dtype=hidden.dtype)
            out[row, pos] = hidden[row, pos] + delta[on_device(candidate.index, delta.device)]
            # the row's own entry on its exact state reproduces the layer (see EntrySearch._reproduces)
            run.exact[row] = run.exact[row] and candidate.entry.source == run.digests[row]
        if run.with_kv and served:  # all rows are served together (see _choose)
            entries = [served[r].entry for r in range(run.batch)]
            replay_kv_writes(find_cache(arguments), self._batch_writes(run, entries))
        return out
