"""The prefix entry: one block of a prompt, with every layer's key/value states and the final hidden states."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...entries import StoredEntry, refuse_unknown, require

_FIELDS = frozenset({"key", "value", "hidden", "tokens", "parent"})


@dataclass(frozen=True)
class BlockShape:
    """The shapes of this model's blocks: what a stored block must have to be spliced into its KV cache."""

    n_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    block_size: int

    def kv(self, tokens: int) -> tuple[int, int, int, int]:
        return (self.n_layers, self.kv_heads, tokens, self.head_dim)


@dataclass
class PrefixBlock(StoredEntry):
    """Up to ``block_size`` tokens of a prompt, found by the chain digest of everything before and including them
    (:mod:`.chain`), and by its parent's digest with its tokens for token-granular matching (:mod:`.siblings`)."""

    key: torch.Tensor
    """(layers, kv_heads, tokens, head_dim) key states of every layer."""
    value: torch.Tensor
    """(layers, kv_heads, tokens, head_dim) value states of every layer."""
    hidden: torch.Tensor
    """(tokens, hidden) final hidden states."""
    tokens: torch.Tensor
    """(tokens,) int64 token ids."""
    parent: bytes
    """The chain digest of the block before it (the chain root for the first)."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        parent = torch.frombuffer(bytearray(self.parent), dtype=torch.uint8)
        return {"key": self.key, "value": self.value, "hidden": self.hidden, "tokens": self.tokens, "parent": parent}

    @classmethod
    def from_tensors(cls, values: dict[str, torch.Tensor]) -> PrefixBlock:
        parent = bytes(values["parent"].cpu().tolist())
        return cls(values["key"], values["value"], values["hidden"], values["tokens"], parent)

    def fits(self, shape: BlockShape, size: int | None = None) -> bool:
        """A block of this model's shapes; of exactly ``size`` tokens when given."""
        n = self.tokens.numel()
        return (
            1 <= n <= shape.block_size
            and (size is None or n == size)
            and tuple(self.key.shape) == shape.kv(n)
            and tuple(self.value.shape) == shape.kv(n)
            and tuple(self.hidden.shape) == (n, shape.hidden_size)
        )

    @classmethod
    def validate(cls, values: dict[str, torch.Tensor], shape: BlockShape) -> None:
        refuse_unknown(values, _FIELDS, "a prefix block")
        n = require(values, "tokens", torch.long, (None,)).numel()
        require(values, "parent", torch.uint8, (32,))
        if not 1 <= n <= shape.block_size:
            raise ValueError(f"holds {n} tokens; this model's blocks hold 1 to block_size {shape.block_size}.")
        require(values, "key", None, shape.kv(n))
        require(values, "value", None, shape.kv(n))
        require(values, "hidden", None, (n, shape.hidden_size))
