"""The prefix strategy's own config fields (torch-free: the command line's ``inspect`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import StrategyConfig, check_number

MAX_BLOCK_SIZE = 1024
"""The largest ``block_size``: reuse is token-exact at any block size, so larger blocks only save bookkeeping, while
every stored block, a prompt's incomplete last one too, occupies a whole slot of ``block_size`` tokens of every
layer's keys and values (SmolLM2-135M: 48 KB a token, 49 MB a slot at 1024)."""


@dataclass
class PrefixConfig(StrategyConfig):
    """``strategy="prefix"``: lossless reuse of shared prompt prefixes in causal decoders (docs/prefix.md)."""

    reads = ("shared_store", "shared_store_kwargs", "verify_fraction")

    block_size: int = 16
    """Tokens per block of the ``prefix`` strategy. A prompt is cut into blocks, each keyed by everything before
    it, and reuse ends at the last complete cached block: small blocks reuse more of a shared prefix that ends
    mid-block, large blocks mean fewer entries and lookups. 16 is vLLM's default; 1 to 1024 (a prompt's incomplete
    last block is stored too, and charged a whole block)."""

    def __post_init__(self) -> None:
        check_number(
            "block_size", self.block_size, 1, MAX_BLOCK_SIZE, integer=True, what=f"an int from 1 to {MAX_BLOCK_SIZE}"
        )
