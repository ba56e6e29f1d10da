"""Entries: the typed :class:`SemanticEntry`, storing computed rows as entries with their K/V, and packing stored
K/V back into a batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...bank import CacheBank
from ...entries import StoredEntry, refuse_unknown, require
from ...kv import KVWrite, check_writes, decode_writes, encode_writes, place_writes
from ...verified import OBSERVATIONS, ErrorBound, check_observations, new_observations
from .alignment import on_device
from .run import LayerSlot, SemanticRun

if TYPE_CHECKING:
    from ...config import LayerCacheConfig
    from ..base import StrategyContext

PREDICTION = "prediction"
"""With ``acceptance="argmax"``, the entry field holding its request's prediction (one int64; -1 until known)."""
KINDS = ("state", "delta")
"""What an entry holds: a layer's output (``reuse="state"``) or its update, output minus input (``"residual"``)."""
_KV_RECORDED, _SOURCE = 0, slice(1, 5)
"""Fields of an entry's ``meta`` int64 tensor: one small tensor instead of two keeps a store cheap."""


@dataclass
class SemanticEntry(StoredEntry):
    """One exactly computed row of one layer: what it produced at its real tokens, and what finds and checks it."""

    kind: str
    """``"state"`` or ``"delta"`` (:data:`KINDS`), the name :attr:`value` is stored under."""
    value: torch.Tensor
    """(real tokens, hidden): the layer's output or update at the row's real tokens."""
    tokens: torch.Tensor
    """The row's real token ids (int64; empty for a row given as embeddings), to align other rows to it."""
    source: bytes
    """The digest of the row's input, shared by its entries in every layer's bank (to find its K/V there)."""
    kv_recorded: bool
    """Whether :attr:`writes` holds the layer's K/V for the row, so requests with a KV cache may use it."""
    writes: list[KVWrite]
    observations: torch.Tensor | None = None
    """With ``max_error_rate``: verdicts of its verified reuses (:mod:`hf_layercache.verified`)."""
    prediction: torch.Tensor | None = None
    """With ``acceptance="argmax"``: the prediction its request got (see :data:`PREDICTION`)."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        source = torch.frombuffer(bytearray(self.source), dtype=torch.int64)
        values = {
            self.kind: self.value,
            "tokens": self.tokens,
            "meta": torch.cat([torch.tensor([int(self.kv_recorded)], dtype=torch.long), source]),
            **encode_writes(self.writes),
        }
        if self.observations is not None:
            values[OBSERVATIONS] = self.observations
        if self.prediction is not None:
            values[PREDICTION] = self.prediction
        return values

    @classmethod
    def from_tensors(cls, values: dict[str, torch.Tensor]) -> SemanticEntry:
        kind = "state" if "state" in values else "delta"
        meta = values["meta"]
        return cls(
            kind=kind,
            value=values[kind],
            tokens=values["tokens"],
            source=meta[_SOURCE].numpy().tobytes(),
            kv_recorded=bool(meta[_KV_RECORDED]),
            writes=decode_writes(values),
            observations=values.get(OBSERVATIONS),
            prediction=values.get(PREDICTION),
        )

    @classmethod
    def validate(cls, values: dict[str, torch.Tensor], hidden_size: int | None = None) -> None:
        kinds = [kind for kind in KINDS if kind in values]
        if len(kinds) != 1:
            raise ValueError(f"a semantic entry holds one of {list(KINDS)}; found {kinds}.")
        value = require(values, kinds[0], None, (None, hidden_size))
        tokens = require(values, "tokens", torch.long, (None,))
        if tokens.numel() not in (0, value.shape[0]):
            raise ValueError(f"'tokens' has {tokens.numel()} ids for {value.shape[0]} stored positions.")
        require(values, "meta", torch.long, (5,))
        check_writes(values)
        if OBSERVATIONS in values:
            check_observations(values[OBSERVATIONS])
        if PREDICTION in values:
            check_prediction(values[PREDICTION])
        known = {*kinds, "tokens", "meta", OBSERVATIONS, PREDICTION}
        refuse_unknown({k: v for k, v in values.items() if not k.startswith("kv.")}, known, "a semantic entry")


def check_prediction(prediction: torch.Tensor) -> None:
    """Refuse a recorded prediction from disk that is not one class index (or -1, unknown)."""
    if prediction.dtype != torch.long or tuple(prediction.shape) != (1,) or int(prediction[0]) < -1:
        raise ValueError(f"'{PREDICTION}' must be an int64 tensor of shape (1,) holding a class index or -1.")


class EntryStore:
    """The part of :class:`~.strategy.SemanticStrategy` that writes entries and reads their K/V back.

    A mixin: the strategy sets these attributes in ``__init__``.
    """

    context: StrategyContext
    config: LayerCacheConfig
    banks: dict[str, CacheBank]
    error_bound: ErrorBound | None

    def _store(
        self,
        slot: LayerSlot,
        run: SemanticRun,
        keys: torch.Tensor,
        out: torch.Tensor,
        hidden: torch.Tensor,
        rows: list[int],
        writes: list[KVWrite],
        kind: str,
    ) -> None:
        """Keep what the exact rows among ``rows`` computed: their update (``"delta"``) or output (``"state"``)."""
        if run.with_kv and not writes:
            return  # an entry without the layer's K/V could not serve a request that needs them
        bank = self.banks[slot.layer.name]
        seconds = self.context.counters.seconds_per_row(slot.layer.name)
        for row in rows:
            if not run.exact[row]:
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
            )
            bank.put(entry, digest=run.digests[row], key=keys[row], cost=seconds, namespace=run.namespace)

    @staticmethod
    def _row_write(write: KVWrite, row: int, pos) -> KVWrite:
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

    def _batch_writes(self, run: SemanticRun, entries: list[SemanticEntry]) -> list[KVWrite]:
        """Per-row recorded K/V (real tokens only) placed back at each row's real positions in the padded batch."""
        return place_writes([entry.writes for entry in entries], run.positions, run.mask.shape[1])
