"""Residual reuse (``reuse="residual"``): a hit adds an earlier input's layer update to the row's own state."""

from __future__ import annotations

from typing import Any

import torch

from ...events import Lookup
from ...kv import find_cache, replay_kv_writes
from .alignment import on_device, take
from .parts import ReuseParts
from .run import Candidate, Compute, LayerSlot, SemanticRun
from .store import batch_writes


class ResidualStep:
    """Serves one cached layer of a run under ``reuse="residual"``: every layer is keyed on its own input and looks
    up, finds (``search``), verifies (``verifier``) and stores (``store``) on its own, so hit rates differ by depth."""

    def __init__(self, parts: ReuseParts):
        self.run_builder, self.search, self.verifier = parts.run_builder, parts.search, parts.verifier
        self.entry_store, self.banks, self.record_lookup = parts.entry_store, parts.banks, parts.record_lookup

    def __call__(
        self, slot: LayerSlot, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, compute: Compute
    ) -> torch.Tensor:
        """Serve ``hidden + cached update`` to rows with a similar entry; compute (and store) the others."""
        keys = self.run_builder.key(run, hidden)
        found, _ = self.search.find(slot, run, keys, list(range(run.batch)), "delta")
        candidates = self.search.choose(slot, run, arguments, found)
        served = {r: c for r, c in candidates.items() if not c.verify}
        self._record_lookup(slot, run, served)
        compute_rows = [r for r in range(run.batch) if r not in served]
        if compute_rows:
            out, writes = compute(compute_rows)
            # judged before storing: a stored row replaces the entry of the same input, and takes its observations
            self.verifier.check(run, {r: c for r, c in candidates.items() if c.verify}, hidden, out)
            self.entry_store.store(slot, run, keys, out, hidden, compute_rows, writes, "delta")
        else:
            out = hidden.clone()
        for row, candidate in served.items():
            pos = on_device(run.positions[row], hidden.device)
            delta = candidate.entry.value.to(device=hidden.device, dtype=hidden.dtype)
            out[row, pos] = hidden[row, pos] + take(delta, candidate.index)
            # the row's own entry on its exact state reproduces the layer (see EntrySearch.choose)
            run.exact[row] = run.exact[row] and candidate.entry.source == run.digests[row]
        if run.with_kv and served:  # all rows are served together (see EntrySearch.choose)
            entries = [served[r].entry for r in range(run.batch)]
            replay_kv_writes(find_cache(arguments), batch_writes(run, entries))
        return out

    def _record_lookup(self, slot: LayerSlot, run: SemanticRun, served: dict[int, Candidate]) -> None:
        """The rows ``served`` hit in ``slot``'s layer; every other row (verified ones too) is computed there."""
        lookup = Lookup([(c.entry_id, c.score) for c in served.values()], missed=run.batch - len(served))
        self.record_lookup(lookup, self.banks[slot.layer.name], [slot.layer.name])
