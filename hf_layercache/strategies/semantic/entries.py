"""The typed :class:`SemanticEntry`: one exactly computed row of one layer, as a bank stores and a warm cache saves
it (storing rows is :mod:`.store`'s)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...entries import StoredEntry, refuse_unknown, require
from ...kv import KVWrite, check_writes, decode_writes, encode_writes
from ...verified import OBSERVATIONS, check_observations

ATTENTION_KV = "attention_kv"
"""The entry field holding its row's keys and values in each layer a partial hit computes against (see
:attr:`SemanticEntry.attention_kv`)."""
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
    attention_kv: torch.Tensor | None = None
    """``(layers, 2, heads, real tokens, head_dim)``: the row's keys and values in each looked-up layer of its stack
    up to this one, so a row that adds tokens to this entry's can compute those alone (:mod:`.partial`); ``None``
    where the layers cannot do that."""

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
        if self.attention_kv is not None:
            values[ATTENTION_KV] = self.attention_kv
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
            attention_kv=values.get(ATTENTION_KV),
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
        if ATTENTION_KV in values:
            require(values, ATTENTION_KV, None, (None, 2, None, value.shape[0], None))
        known = {*kinds, "tokens", "meta", OBSERVATIONS, PREDICTION, ATTENTION_KV}
        refuse_unknown({k: v for k, v in values.items() if not k.startswith("kv.")}, known, "a semantic entry")


def check_prediction(prediction: torch.Tensor) -> None:
    """Refuse a recorded prediction from disk that is not one class index (or -1, unknown)."""
    if prediction.dtype != torch.long or tuple(prediction.shape) != (1,) or int(prediction[0]) < -1:
        raise ValueError(f"'{PREDICTION}' must be an int64 tensor of shape (1,) holding a class index or -1.")
