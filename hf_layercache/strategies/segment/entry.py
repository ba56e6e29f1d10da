"""The segment entry: one passage's states of every layer, with the position it was computed at."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...entries import StoredEntry, refuse_unknown, require

_FIELDS = frozenset({"key", "value", "hidden", "tokens", "start"})


@dataclass(frozen=True)
class SegmentShape:
    """This model's state shapes: what a stored segment must have to be laid into its KV cache."""

    n_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int

    def kv(self, tokens: int) -> tuple[int, int, int, int]:
        return (self.n_layers, self.kv_heads, tokens, self.head_dim)


@dataclass
class SegmentEntry(StoredEntry):
    """A segment's states as the prompt that first held it computed them, found by its own tokens (any position)."""

    key: torch.Tensor
    """(layers, kv_heads, tokens, head_dim) key states, rotated for positions ``start..start+tokens-1``."""
    value: torch.Tensor
    """(layers, kv_heads, tokens, head_dim) value states."""
    hidden: torch.Tensor
    """(tokens, hidden) final hidden states."""
    tokens: torch.Tensor
    """(tokens,) int64 token ids."""
    start: torch.Tensor
    """() int64: the position of its first token when computed (0: its states saw nothing before it)."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"key": self.key, "value": self.value, "hidden": self.hidden, "tokens": self.tokens, "start": self.start}

    @classmethod
    def from_tensors(cls, values: dict[str, torch.Tensor]) -> SegmentEntry:
        return cls(values["key"], values["value"], values["hidden"], values["tokens"], values["start"])

    def fits(self, shape: SegmentShape, tokens: torch.Tensor) -> bool:
        """The entry of exactly ``tokens`` in this model's shapes (a digest collision or a stale shape: a miss)."""
        n = tokens.numel()
        return (
            tuple(self.key.shape) == shape.kv(n)
            and tuple(self.value.shape) == shape.kv(n)
            and tuple(self.hidden.shape) == (n, shape.hidden_size)
            and torch.equal(self.tokens.cpu(), tokens)
        )

    @classmethod
    def validate(cls, values: dict[str, torch.Tensor], shape: SegmentShape) -> None:
        refuse_unknown(values, _FIELDS, "a segment entry")
        n = require(values, "tokens", torch.long, (None,)).numel()
        start = require(values, "start", torch.long, ())
        if n == 0 or int(start) < 0:
            raise ValueError(f"holds {n} tokens from position {int(start)}; expected at least one, from 0 or later.")
        require(values, "key", None, shape.kv(n))
        require(values, "value", None, shape.kv(n))
        require(values, "hidden", None, (n, shape.hidden_size))
