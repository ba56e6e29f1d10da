"""The prefix strategy's side of the shared tier: fetch the blocks a batch's rows lack locally.

First round trip: every row's chain digests (and that of its last, partial block) at once. Second, only for rows
whose chain is held in part (in the bank or Redis) but not to its end: the partial blocks that may follow the last
block held (a previous turn's answer, or a prompt, that ended mid-block), one key per length shorter than the row's
next block, so the sibling match that follows finds them as it finds local ones. Each block found is checked to be
the block its key names (``chain_step(parent, tokens)`` is its digest) on top of the entry checks, put in the local
bank and indexed under its parent.
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
    chains = {r: chain_digests(row.tokens, block_size, root) for r, row in enumerate(rows) if row.tokens is not None}
    digests = []
    for r, chain in chains.items():
        digests += chain
        row = rows[r]
        if row.length % block_size:
            digests.append(chain_step(chain[-1] if chain else root, row.tokens[len(chain) * block_size :]))
    _fill(shared, bank, siblings, digests, namespace)
    partial = []
    for r, chain in chains.items():
        held = _held(bank, chain)
        upcoming = rows[r].tokens[held * block_size : (held + 1) * block_size]
        if held and len(upcoming) > 1 and bank.find(chain_step(chain[held - 1], upcoming)) is None:
            partial += [chain_step(chain[held - 1], upcoming[:n]) for n in range(1, len(upcoming))]
    if partial:
        _fill(shared, bank, siblings, partial, namespace)


def _held(bank: CacheBank, chain: list[bytes]) -> int:
    """How many leading blocks of ``chain`` the bank holds."""
    for i, digest in enumerate(chain):
        if bank.find(digest) is None:
            return i
    return len(chain)


def _fill(shared: SharedStore, bank: CacheBank, siblings: SiblingIndex, digests: list[bytes], namespace: int) -> None:
    def check(digest: bytes, values: dict[str, torch.Tensor]) -> None:
        block = PrefixBlock.from_tensors(values)
        if chain_step(block.parent, block.tokens) != digest:
            raise ValueError("its parent and tokens do not hash to the key it was stored under")

    for _, entry_id, block in shared.fill(bank, digests, namespace, check):
        siblings.add(block.parent, entry_id, block.tokens)
