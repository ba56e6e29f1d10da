"""Storing new blocks: a call's, read from its filled cache and spliced hidden states, and (:mod:`.answers`) the
tokens a ``generate()`` call decoded."""

from __future__ import annotations

from typing import Any

import torch

from ...bank import CacheBank
from ..base import SharedStore
from .block import PrefixBlock
from .run import PrefixRun
from .siblings import SiblingIndex


class BlockStore:
    """Puts the blocks a call computed into the bank (and the shared tier), and indexes them under their parents."""

    def __init__(self, bank: CacheBank, siblings: SiblingIndex, shared: SharedStore | None, n_layers: int):
        self.bank = bank
        self.siblings = siblings
        self.shared = shared
        self.n_layers = n_layers

    def store(self, run: PrefixRun, namespace: int, seconds_per_token: float) -> None:
        """Every row's pending blocks, chain tails first: recency-based policies then evict a chain from its tail and
        never drop the shared head while its tails survive. A block another row of the call stores too (the same
        digest) is stored once."""
        if run.cache.get_seq_length() != run.hidden.shape[1]:
            return  # the model did not leave the states we expect: store nothing rather than guess
        layers = run.cache.layers[: self.n_layers]
        stored: set[bytes] = set()
        pending = [(i, run.rows[r], block) for i, r in enumerate(run.group.rows) for block in run.rows[r].pending]
        for i, row, block in reversed(pending):
            if block.digest in stored or self.bank.find(block.digest) is not None:
                continue
            stored.add(block.digest)
            column = row.first + block.start
            entry = PrefixBlock(
                key=self.states(layers, "keys", i, column, column + block.size),
                value=self.states(layers, "values", i, column, column + block.size),
                hidden=run.hidden[i, column : column + block.size],
                tokens=row.tokens[block.start : block.start + block.size].clone(),
                parent=block.parent,
            )
            self.put(entry, block.digest, namespace, seconds_per_token * block.size)
        self.sweep()

    def states(self, layers: list[Any], name: str, row: int, start: int, end: int) -> torch.Tensor:
        """Keys or values ``(layer, head, token, dim)`` of one row's columns ``[start, end)``: per layer a block's
        slice is small enough that copying it stays on one thread (a copy torch splits between threads waits for
        both, and on a busy machine that wait cost more than the copy)."""
        return torch.stack([getattr(layer, name)[row, :, start:end].to(self.bank.device) for layer in layers])

    def put(self, entry: PrefixBlock, digest: bytes, namespace: int, cost: float) -> None:
        """One block into the bank, the shared tier (written in the background) and the sibling index."""
        entry_id = self.bank.put(entry, digest=digest, cost=cost, namespace=namespace)
        if self.shared is not None:
            self.shared.write(self.bank, entry_id, digest, namespace, cost)
        if entry_id is not None:
            self.siblings.add(entry.parent, entry_id, entry.tokens)

    def sweep(self) -> None:
        """Drop evicted entries from the sibling index once it has grown (amortised)."""
        self.siblings.sweep_if_large(self.bank.__contains__, len(self.bank))
