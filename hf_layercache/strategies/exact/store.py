"""Storing a stack's missed rows, and auditing the hits ``verify_fraction`` draws against what the layers computed."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ...bank import CacheBank
from ...events import Verdict
from ...kv import KVWrite
from ...layers import CachedLayer
from ..base import SharedStore
from .digests import RowKey
from .entry import ExactEntry
from .run import StackRun

RecordVerdict = Callable[[Verdict, CacheBank, str], None]


class RowStore:
    """Puts the rows a stack computed into its bank (and the shared tier), after checking the audited hits."""

    def __init__(self, bank: CacheBank, shared: SharedStore | None, record_verdict: RecordVerdict):
        self.bank = bank
        self.shared = shared
        self.record_verdict = record_verdict
        self._warned = False

    def store(
        self,
        run: StackRun,
        layer: CachedLayer,
        output: torch.Tensor,
        out_rows: list[int],
        rows: list[int] | None = None,
    ) -> None:
        """Store the last layer's output of the missed rows (``out_rows`` index ``output``; ``rows`` the batch)."""
        for out_row, row in zip(out_rows, rows if rows is not None else out_rows, strict=True):
            key = run.keys[row]
            if row in run.audits and self._audit(layer, run.audits[row], key, output[out_row]):
                continue  # the stored entry reproduced the layer: keep it (and its place in the policy)
            real = key.columns if key.free else slice(None)  # a layout-bound row keeps its writes whole
            writes = {
                position: [
                    KVWrite(w.tag, w.layer_idx, w.key[row : row + 1, :, real], w.value[row : row + 1, :, real])
                    for w in writes
                ]
                for position, writes in run.writes.items()
            }
            entry = ExactEntry(output[out_row], key.layout, run.with_kv, writes)
            entry_id = self.bank.put(entry, digest=run.digests[row], cost=run.seconds_per_row, namespace=run.namespace)
            if self.shared is not None:  # written to the replicas' Redis in the background
                self.shared.write(self.bank, entry_id, run.digests[row], run.namespace, run.seconds_per_row)

    def _audit(self, layer: CachedLayer, audit: tuple[int, ExactEntry], key: RowKey, computed: torch.Tensor) -> bool:
        """Whether a hit drawn for verification holds what the layer just computed for it. One that does not (a
        poisoned or stale entry) is dropped, so the computed output replaces it, and is reported."""
        entry_id, entry = audit
        same_layout = entry.layout == key.layout
        stored = (entry.hidden if same_layout else entry.hidden[entry.real]).float()
        fresh = (computed if same_layout else computed[key.columns]).float()
        stored = stored.to(fresh.device)
        agrees = stored.shape == fresh.shape and torch.allclose(stored, fresh, rtol=1e-4, atol=1e-5)
        error = ((stored - fresh).norm() / fresh.norm().clamp_min(1e-12)).item() if stored.shape == fresh.shape else 1.0
        self.record_verdict(Verdict(entry_id, error, agrees, explored=False), self.bank, layer.name)
        if not agrees:
            self.bank.remove(entry_id)
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"An exact cache entry of {layer.stack!r} disagrees with the layer it stands for (relative error "
                    f"{error:.3g}): it was dropped and the computed output served. Entries loaded from an unsigned "
                    "warm cache may have been altered; see integrity_key in docs/reliability.md.",
                    stacklevel=2,
                )
        return agrees
