"""The attention entry: what one request row's softmax attention of one layer left to reuse, and what a later
request compares it by."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...entries import StoredEntry, refuse_unknown, require

_FIELDS = frozenset({"lse", "mask", "query", "key", "value", "output"})


@dataclass
class AttentionEntry(StoredEntry):
    """The states a map ``A = exp(S - lse)`` was computed from, its log-normaliser and its output, so a later row
    can tell which of its positions moved (see :class:`~.engine.CachedAttention`).

    The map itself is not stored: ``A[h, q, k] = exp(query[h, q] . key[k] * scaling - lse[h, q])`` where ``mask``
    allows it, and a hit needs it only on the few keys that changed and the few rows it verifies, so it recomputes
    those from the stored states. Storing it would cost ``L / head_dim`` times the memory of everything else, and
    materialising it on a miss costs several times a fused attention kernel."""

    lse: torch.Tensor
    """(heads, L) float32 log-normaliser of each row."""
    mask: torch.Tensor
    """(L, L) bool, where a query could attend."""
    query: torch.Tensor
    """(heads, L, head_dim) query states."""
    key: torch.Tensor
    """(kv_heads, L, head_dim) key states."""
    value: torch.Tensor
    """(kv_heads, L, head_dim) value states."""
    output: torch.Tensor
    """(heads, L, head_dim) ``A @ value``: a hit whose keys or values moved at few positions corrects it at those
    positions instead of recomputing ``A @ value`` (a full ``L^2`` pass, as costly as a fused sdpa kernel)."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        # the normaliser is stored as its bits: storage_dtype must not round it
        lse = self.lse.float().view(torch.int32)
        return {
            "lse": lse,
            "mask": self.mask,
            "query": self.query,
            "key": self.key,
            "value": self.value,
            "output": self.output,
        }

    @classmethod
    def from_tensors(cls, values: dict[str, torch.Tensor]) -> AttentionEntry:
        lse = values["lse"].view(torch.float32)
        fields = ("mask", "query", "key", "value", "output")
        return cls(**{name: values[name] for name in fields}, lse=lse)

    @classmethod
    def validate(cls, values: dict[str, torch.Tensor], heads: int | None = None) -> None:
        lse = require(values, "lse", torch.int32, (None, None))
        if heads and lse.shape[0] != heads:
            raise ValueError(f"'lse' has {lse.shape[0]} heads; this layer has {heads}.")
        heads, length = lse.shape
        require(values, "mask", torch.bool, (length, length))
        query = require(values, "query", None, (heads, length, None))
        key = require(values, "key", None, (None, length, query.shape[-1]))
        if key.shape[0] == 0 or heads % key.shape[0]:
            raise ValueError(f"'key' has {key.shape[0]} heads, which must divide the {heads} query heads.")
        value = require(values, "value", None, (key.shape[0], length, None))
        require(values, "output", None, (heads, length, value.shape[-1]))
        refuse_unknown(values, _FIELDS, "an attention entry")
