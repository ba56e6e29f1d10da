"""The prefix strategy's side of the shared tier: fetch the blocks a batch's rows lack locally, in one round trip.

Every row's chain digests (and that of its last, partial block) are asked of Redis at once; each block found is
checked to be the block its key names (``chain_step(parent, tokens)`` is its digest) on top of the entry checks,
put in the local bank and indexed under its parent, so the row lookup that follows finds it, partial blocks
included for token-granular matching.
"""

from __future__ import annotations

import torch

from ...bank import CacheBank
from ..base import SharedStore
from .block import PrefixBlock
from .chain import chain_digests, chain_step
from .run import Row
from .siblings import SiblingIndex


def fetch_blocks(
    shared: SharedStore,
    bank: CacheBank,
    siblings: SiblingIndex,
    rows: list[Row],
    block_size: int,
    root: bytes,
    namespace: int,
) -> None:
    """Put the blocks of ``rows`` that Redis holds and ``bank`` lacks into the bank and the sibling index."""
    digests = []
    for row in rows:
        if row.tokens is None:
            continue
        chain = chain_digests(row.tokens, block_size, root)
        digests += chain
        if row.length % block_size:
            digests.append(chain_step(chain[-1] if chain else root, row.tokens[len(chain) * block_size :]))

    def check(digest: bytes, values: dict[str, torch.Tensor]) -> None:
        block = PrefixBlock.from_tensors(values)
        if chain_step(block.parent, block.tokens) != digest:
            raise ValueError("its parent and tokens do not hash to the key it was stored under")

    for _, entry_id, block in shared.fill(bank, digests, namespace, check):
        siblings.add(block.parent, entry_id, block.tokens)
