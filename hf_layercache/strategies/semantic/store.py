"""Storing: the exactly computed rows of a layer become entries with their K/V, and stored K/V go back into a batch."""

from __future__ import annotations

import torch

from ...bank import CacheBank
from ...config import LayerCacheConfig
from ...kv import KVWrite, place_writes
from ...stats import CacheStats
from ...verified import ErrorBound, new_observations
from .alignment import Index, on_device
from .entries import SemanticEntry
from .partial import row_kv
from .run import LayerSlot, SemanticRun


class EntryStore:
    """Writes what a layer computed for a run's exact rows into the layer's bank.

    Only rows whose state so far was computed become entries (``run.exact``), so approximations never feed on
    themselves, and only rows whose tokens computed at positions from 0 (``run.at_start``), where the rows they may
    serve compute. An entry carries the layer's measured seconds per row as its cost (for the policy), the observations
    of the entry of the same input it replaces (``max_error_rate``: what was learnt survives a recompute), and an
    unknown prediction with ``acceptance="argmax"`` (filled in once its request's output is known).
    """

    def __init__(
        self,
        banks: dict[str, CacheBank],
        counters: CacheStats,
        config: LayerCacheConfig,
        error_bound: ErrorBound | None,
    ):
        self.banks = banks
        """The strategy's banks by layer name, filled as it attaches."""
        self.counters = counters
        self.config = config
        self.error_bound = error_bound

    def store(
        self,
        slot: LayerSlot,
        run: SemanticRun,
        keys: torch.Tensor,
        out: torch.Tensor,
        hidden: torch.Tensor,
        rows: list[int],
        writes: list[KVWrite],
        kind: str,
        kv_layers: range | None = None,
    ) -> None:
        """Keep what the exact rows among ``rows`` computed: their update (``"delta"``) or output (``"state"``), and
        with ``kv_layers`` (stack positions) their K/V there, recorded in ``run.captured``, for partial hits."""
        if run.with_kv and not writes:
            return  # an entry without the layer's K/V could not serve a request that needs them
        bank = self.banks[slot.layer.name]
        seconds = self.counters.seconds_per_row(slot.layer.name)
        for row in rows:
            if not run.exact[row] or not run.at_start[row]:
                continue
            pos = on_device(run.positions[row], out.device)
            entry = SemanticEntry(
                kind=kind,
                value=out[row, pos] - hidden[row, pos] if kind == "delta" else out[row, pos],
                tokens=self._tokens(run, row),
                source=run.digests[row],
                kv_recorded=run.with_kv,
                writes=[self._row_write(w, row, pos) for w in writes],
                observations=self._observations_of(bank, run.digests[row]) if self.error_bound is not None else None,
                prediction=torch.full((1,), -1, dtype=torch.long) if self.config.acceptance == "argmax" else None,
                attention_kv=self._attention_kv(run, kv_layers, row, pos) if kv_layers is not None else None,
            )
            bank.put(entry, digest=run.digests[row], key=keys[row], cost=seconds, namespace=run.namespace)

    @staticmethod
    def _attention_kv(run: SemanticRun, kv_layers: range, row: int, pos: Index) -> torch.Tensor | None:
        """The row's recorded K/V, or its twin's (a layer computes one of two identical rows and copies it)."""
        kv = row_kv(run.captured, kv_layers, row)
        if kv is None and row in run.twins:
            kv = row_kv(run.captured, kv_layers, run.twins[row])
        return kv

    @staticmethod
    def _row_write(write: KVWrite, row: int, pos: Index) -> KVWrite:
        """The part of a batch write an entry keeps: its row, at its real positions."""
        kv_pos = on_device(pos, write.key.device)
        key, value = write.key[row : row + 1][..., kv_pos, :], write.value[row : row + 1][..., kv_pos, :]
        return KVWrite(write.tag, write.layer_idx, key, value)

    @staticmethod
    def _observations_of(bank: CacheBank, digest: bytes) -> torch.Tensor:
        """A new entry's observations: those of the entry of the same input it replaces, if any, else none."""
        entry_id = bank.find(digest)
        old = bank.get(entry_id) if entry_id is not None else None
        return old.observations.clone() if old is not None and old.observations is not None else new_observations()

    @staticmethod
    def _tokens(run: SemanticRun, row: int) -> torch.Tensor:
        """A fresh copy of the row's token ids: entries sharing storage could not be saved (safetensors refuses
        shared tensors); the tensor is built once per request."""
        if row not in run.token_tensors:
            tokens = run.tokens[row]
            run.token_tensors[row] = torch.tensor(tokens if tokens is not None else [], dtype=torch.long)
        return run.token_tensors[row].clone()


def batch_writes(run: SemanticRun, entries: list[SemanticEntry]) -> list[KVWrite]:
    """Per-row recorded K/V (real tokens only) placed back at each row's real positions in the padded batch, for a
    KV cache to receive what the served rows' layers would have written."""
    return place_writes([entry.writes for entry in entries], run.positions, run.mask.shape[1])
