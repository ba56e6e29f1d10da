"""Storing a group's new blocks after its call: read from the filled cache and the spliced hidden states."""

from __future__ import annotations

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
            column, tokens = row.first + block.start, row.tokens[block.start : block.start + block.size].clone()
            end = column + block.size
            entry = PrefixBlock(
                key=torch.stack([layer.keys[i, :, column:end].to(self.bank.device) for layer in layers]),
                value=torch.stack([layer.values[i, :, column:end].to(self.bank.device) for layer in layers]),
                hidden=run.hidden[i, column:end],
                tokens=tokens,
                parent=block.parent,
            )
            cost = seconds_per_token * block.size
            entry_id = self.bank.put(entry, digest=block.digest, cost=cost, namespace=namespace)
            if self.shared is not None:  # written to the replicas' Redis in the background
                self.shared.write(self.bank, entry_id, block.digest, namespace, cost)
            if entry_id is not None:
                self.siblings.add(block.parent, entry_id, tokens)
        self.siblings.sweep_if_large(self.bank.__contains__, len(self.bank))
