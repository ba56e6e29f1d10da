"""The prefix strategy's side of the shared tier: fetch the blocks a batch's rows lack locally, in one round trip.

Every row's chain digests (and that of its last, partial block) are asked of Redis at once; each block found is
checked to be the block its key names (``chain_step(parent, tokens)`` is its digest) on top of the entry checks,
put in the local bank and indexed under its parent, so the strategy's own lookup then finds it, partial blocks
included for token-granular matching.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .block import PrefixBlock
from .chain import chain_digests, chain_step

if TYPE_CHECKING:
    from .rows import Row
    from .strategy import PrefixStrategy


def fetch_blocks(strategy: PrefixStrategy, rows: list[Row], root: bytes, namespace: int) -> None:
    """Put the blocks of ``rows`` that Redis holds and the local bank lacks into the bank and its sibling index."""
    size, digests = strategy.block_size, []
    for row in rows:
        if row.tokens is None:
            continue
        chain = chain_digests(row.tokens, size, root)
        digests += chain
        if row.length % size:
            digests.append(chain_step(chain[-1] if chain else root, row.tokens[len(chain) * size :]))

    def check(digest: bytes, values) -> None:
        block = PrefixBlock.from_tensors(values)
        if chain_step(block.parent, block.tokens) != digest:
            raise ValueError("its parent and tokens do not hash to the key it was stored under")

    for _, entry_id, block in strategy.context.shared.fill(strategy.bank, digests, namespace, check):
        strategy.siblings.add(block.parent, entry_id, block.tokens)
