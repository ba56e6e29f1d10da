"""The prefix strategy's own config fields (torch-free: the command line's ``inspect`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import StrategyConfig


@dataclass
class PrefixConfig(StrategyConfig):
    """``strategy="prefix"``: lossless reuse of shared prompt prefixes in causal decoders (docs/prefix.md)."""

    reads = ("shared_store", "shared_store_kwargs", "verify_fraction")

    block_size: int = 16
    """Tokens per block of the ``prefix`` strategy. A prompt is cut into blocks, each keyed by everything before
    it, and reuse ends at the last complete cached block: small blocks reuse more of a shared prefix that ends
    mid-block, large blocks mean fewer entries and lookups. 16 is vLLM's default."""

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int (tokens per prefix block), got {self.block_size!r}.")
