"""A request's rows: where each row's real tokens are, and what the bank (and the shared tier) holds of them."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ...bank import CacheBank
from ...kv import CACHE_ARGUMENTS, find_cache
from ...request import namespace_tag
from ..base import SharedStore
from .block import BlockShape
from .chain import chain_digests, chain_root, chain_step, common_prefix
from .run import PendingBlock, Row
from .shared_blocks import fetch_blocks
from .siblings import SiblingIndex

_HANDLED = frozenset({"input_ids", "attention_mask", "position_ids", "logits_to_keep", *CACHE_ARGUMENTS})
"""Tensor arguments prefix reuse understands; a call with any other tensor argument is computed whole."""


class RowLookup:
    """Reads a request's rows and looks each up: its chain of complete blocks in the bank, then the cached sibling
    sharing most of its next block; what it lacks becomes its pending blocks.

    With a shared tier, the blocks the replicas computed are fetched first (one round trip for the batch) and go
    into the bank and the sibling index, so the local lookup finds them like its own.
    """

    def __init__(self, bank: CacheBank, siblings: SiblingIndex, shape: BlockShape, shared: SharedStore | None):
        self.bank = bank
        self.siblings = siblings
        self.shape = shape
        self.block_size = shape.block_size
        self.shared = shared

    def rows(self, namespace: str, arguments: dict[str, Any]) -> list[Row] | None:
        """Per row: real tokens, what the cache holds of them, what to store; ``None``: the call passes through
        (inputs, masks, positions or a cache that prefix reuse cannot serve exactly)."""
        input_ids = arguments.get("input_ids")
        mask = arguments.get("attention_mask")
        positions = arguments.get("position_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            return None
        if any(_is_data(v) for k, v in arguments.items() if k not in _HANDLED):
            return None
        if not _fillable(find_cache(arguments)):
            return None  # a decode step, or a cache this strategy does not fill
        if mask is not None and (mask.dim() != 2 or mask.shape != input_ids.shape):
            return None
        if positions is not None and (positions.dim() != 2 or positions.shape[-1] != input_ids.shape[1]):
            return None
        batch, length = input_ids.shape
        ids = input_ids.detach().cpu()
        mask = mask.detach().cpu() if mask is not None else torch.ones(batch, length, dtype=torch.long)
        positions = positions.detach().cpu().expand(batch, length) if positions is not None else None
        root = chain_root(namespace, self.block_size)
        tag = namespace_tag(namespace)
        rows = [_row(ids[r], mask[r], positions[r] if positions is not None else None) for r in range(batch)]
        if self.shared is not None:  # blocks the replicas computed, in one round trip (docs/shared.md)
            fetch_blocks(self.shared, self.bank, self.siblings, rows, self.block_size, root, tag)
        for row in rows:
            if row.tokens is not None:
                self._look_up(row, root, tag)
        return rows

    def _look_up(self, row: Row, root: bytes, namespace: int) -> None:
        """Follow the row's chain, then match its next block against the siblings; list the blocks to store."""
        size = self.block_size
        digests = chain_digests(row.tokens, size, root)
        parent = root
        for digest in digests:
            entry_id = self.bank.find(digest)
            block = self.bank.get(entry_id, namespace) if entry_id is not None else None
            if block is None or not block.fits(self.shape, size):
                break
            row.found.append(entry_id)
            row.entries.append(block)
            parent = digest
        start = len(row.found) * size
        if start < row.length:
            self._match_sibling(row, parent, row.tokens[start : start + size], namespace)
        parents, found = [root, *digests], len(row.found)
        row.pending = [PendingBlock(d, parents[b], b * size, size) for b, d in enumerate(digests) if b >= found]
        rest = row.length % size
        if rest:
            digest = chain_step(parents[-1], row.tokens[-rest:])
            if self.bank.find(digest) is None:
                row.pending.append(PendingBlock(digest, parents[-1], row.length - rest, rest))

    def _match_sibling(self, row: Row, parent: bytes, upcoming: torch.Tensor, namespace: int) -> None:
        """The cached child of ``parent`` sharing the most leading tokens with ``upcoming``, checked on the entry."""
        ranked = sorted(
            ((common_prefix(tokens, upcoming), entry_id) for entry_id, tokens in self.siblings.candidates(parent)),
            key=lambda candidate: -candidate[0],  # stable: among equals, the most recent first
        )
        for shared, entry_id in ranked:
            if shared == 0:
                return
            block = self.bank.get(entry_id, namespace)
            if (
                block is not None
                and block.fits(self.shape)
                and block.parent == parent
                and common_prefix(block.tokens.cpu(), upcoming) >= shared
            ):
                row.tail = (entry_id, shared)
                row.entries.append(block)
                return
            self.siblings.discard(parent, entry_id)  # evicted, or a stale hint: never served


def _row(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None) -> Row:
    """One row's real tokens, when they are one contiguous run at positions ``0..n-1`` (where its blocks' states
    were, or will be, computed); else a row computed whole."""
    real = mask.nonzero().flatten()
    if real.numel() == 0:
        return Row(first=len(ids), length=0)
    first, length = int(real[0]), real.numel()
    contiguous = int(real[-1]) - first + 1 == length and bool((mask[real] == 1).all())
    own = positions[first : first + length] if positions is not None else torch.arange(first, first + length)
    if not contiguous or not torch.equal(own, torch.arange(length, dtype=own.dtype)):
        return Row(first=first, length=length)  # states would sit at other positions: computed whole
    return Row(first=first, length=length, tokens=ids[first : first + length])


def _is_data(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (value is not None and hasattr(value, "get_seq_length"))


def _fillable(cache: Any) -> bool:
    """``None`` or an empty ``DynamicCache`` of full-attention (or sliding-window) layers: the caches a prefix
    can be put into."""
    if cache is None:
        return True
    return (
        isinstance(cache, DynamicCache)
        and cache.get_seq_length() == 0
        and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)
    )
