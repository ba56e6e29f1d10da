"""A request's rows: the per-request dataclasses, and how each row's real tokens are found and looked up."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ...bank import CacheBank
from ...kv import CACHE_ARGUMENTS, find_cache
from ...request import RequestScope, namespace_tag
from .block import BlockShape, PrefixBlock
from .chain import chain_digests, chain_root, chain_step, common_prefix
from .shared_blocks import fetch_blocks
from .siblings import SiblingIndex

_HANDLED = frozenset({"input_ids", "attention_mask", "position_ids", "logits_to_keep", *CACHE_ARGUMENTS})
"""Tensor arguments the strategy understands; a call with any other tensor argument is computed whole."""


@dataclass
class Block:
    """A block of a row to store after the call: its key, its parent's key, where it starts and its length."""

    digest: bytes
    parent: bytes
    start: int
    size: int


@dataclass
class Row:
    """One row of a request: where its real tokens are and what of them the cache holds."""

    first: int
    """Column of the first real token (the number of left pad columns)."""
    length: int
    """Real tokens."""
    tokens: torch.Tensor | None = None
    """The real tokens (CPU), or ``None`` when the row may neither reuse nor store (its positions do not fit)."""
    digests: list[bytes] = field(default_factory=list)
    """Chain digests of its complete blocks."""
    found: list[int] = field(default_factory=list)
    """Entry ids of its leading cached complete blocks."""
    tail: tuple[int, int] | None = None
    """``(entry id, tokens)``: a cached sibling of its next block sharing that many leading tokens."""
    entries: list[PrefixBlock] = field(default_factory=list)
    """The stored blocks of ``found`` and ``tail``, held for this call even if the bank evicts them meanwhile."""
    pending: list[Block] = field(default_factory=list)
    """Its blocks the bank lacks, stored after the call."""
    reused: int = 0
    """Real tokens taken from the cache in this call."""

    def cached(self, block_size: int) -> int:
        return len(self.found) * block_size + (self.tail[1] if self.tail else 0)

    def used(self, block_size: int) -> list[int]:
        """Entry ids of the blocks this call reuses (``found`` then ``tail``, as far as :attr:`reused` reaches)."""
        ids = [*self.found, *([self.tail[0]] if self.tail else [])]
        return ids[: math.ceil(self.reused / block_size)]


class RowLookup:
    """The part of :class:`~.strategy.PrefixStrategy` that reads a request: its rows, their chains and siblings.

    A mixin: the strategy sets these attributes in ``attach``.
    """

    bank: CacheBank
    siblings: SiblingIndex
    block_size: int
    shape: BlockShape

    def _rows(self, scope: RequestScope, arguments: dict[str, Any]) -> list[Row] | None:
        """Per row: real tokens, what the cache holds of them, what to store; ``None``: the call passes through."""
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
        root = chain_root(scope.namespace, self.block_size)
        namespace = namespace_tag(scope.namespace)
        rows = [self._row(ids[r], mask[r], positions[r] if positions is not None else None) for r in range(batch)]
        if self.context.shared is not None:  # blocks the replicas computed, in one round trip (docs/shared.md)
            fetch_blocks(self, rows, root, namespace)
        for row in rows:
            if row.tokens is not None:
                self._lookup(row, root, namespace)
        return rows

    def _row(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None) -> Row:
        real = mask.nonzero().flatten()
        if real.numel() == 0:
            return Row(first=len(ids), length=0)
        first, length = int(real[0]), real.numel()
        contiguous = int(real[-1]) - first + 1 == length and bool((mask[real] == 1).all())
        own = positions[first : first + length] if positions is not None else torch.arange(first, first + length)
        if not contiguous or not torch.equal(own, torch.arange(length, dtype=own.dtype)):
            return Row(first=first, length=length)  # states would sit at other positions: computed whole
        return Row(first=first, length=length, tokens=ids[first : first + length])

    def _lookup(self, row: Row, root: bytes, namespace: int) -> None:
        """Follow the row's chain, then match its next block against the siblings; list the blocks to store."""
        size = self.block_size
        row.digests = chain_digests(row.tokens, size, root)
        parent = root
        for digest in row.digests:
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
        parents = [root, *row.digests]
        row.pending = [Block(d, parents[b], b * size, size) for b, d in enumerate(row.digests) if b >= len(row.found)]
        rest = row.length % size
        if rest:
            digest = chain_step(parents[-1], row.tokens[-rest:])
            if self.bank.find(digest) is None:
                row.pending.append(Block(digest, parents[-1], row.length - rest, rest))

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
