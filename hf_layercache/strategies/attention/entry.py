"""The attention entry: one request row's softmax map of one layer, with what a later request compares it by."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...entries import StoredEntry, refuse_unknown, require

_FIELDS = frozenset({"map", "lse", "mask", "query", "key", "value", "output"})


@dataclass
class AttentionEntry(StoredEntry):
    """A stored map ``A = exp(S - lse)`` and the states it was computed from, so a later row can tell which of its
    positions moved (see :class:`~.engine.CachedAttention`)."""

    map: torch.Tensor
    """(heads, L, L) softmax attention weights, stored key-major: ``map[h, k, q]`` is query ``q``'s weight on key
    ``k``. A hit reads the columns of the changed keys, which this layout keeps contiguous (gathering them from a
    query-major map costs more than the arithmetic on them)."""
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
    """(heads, L, head_dim) ``map @ value``: a hit whose values moved at few positions corrects it at those
    positions instead of recomputing ``map @ value`` (a full ``L^2`` pass, as costly as a fused sdpa kernel)."""

    @property
    def length(self) -> int:
        return self.map.shape[-1]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        # the normaliser is stored as its bits: storage_dtype must not round it
        lse = self.lse.float().view(torch.int32)
        return {
            "map": self.map,
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
        fields = ("map", "mask", "query", "key", "value", "output")
        return cls(**{name: values[name] for name in fields}, lse=lse)

    @classmethod
    def validate(cls, values: dict[str, torch.Tensor], heads: int | None = None) -> None:
        stored = require(values, "map", None, (None, None, None))
        if heads and stored.shape[0] != heads:
            raise ValueError(f"'map' has {stored.shape[0]} heads; this layer has {heads}.")
        heads, length = stored.shape[0], stored.shape[1]
        if stored.shape[2] != length:
            raise ValueError(f"'map' must be square in its last two dimensions; found {tuple(stored.shape)}.")
        require(values, "lse", torch.int32, (heads, length))
        require(values, "mask", torch.bool, (length, length))
        require(values, "query", None, (heads, length, None))
        key = require(values, "key", None, (None, length, None))
        value = require(values, "value", None, (key.shape[0], length, None))
        require(values, "output", None, (heads, length, value.shape[-1]))
        refuse_unknown(values, _FIELDS, "an attention entry")
