"""What one request knows, shared by the modules that read and compute it: its rows, the blocks they will store, the
groups of rows that share a call, and each group's call.

Plain data at the bottom of the package, so every other module imports it and it imports none of them (only the
entry type): dependencies point one way, ``strategy -> call / lookup / audit -> layout / store -> run``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from .block import PrefixBlock


@dataclass
class PendingBlock:
    """A block of a row that the bank lacks, stored after the call: its key, its parent's key, where it starts in
    the row's real tokens and how many it holds."""

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
    found: list[int] = field(default_factory=list)
    """Entry ids of its leading cached complete blocks."""
    tail: tuple[int, int] | None = None
    """``(entry id, tokens)``: a cached sibling of its next block sharing that many leading tokens."""
    entries: list[PrefixBlock] = field(default_factory=list)
    """The stored blocks of ``found`` and ``tail``, held for this call even if the bank evicts them meanwhile."""
    pending: list[PendingBlock] = field(default_factory=list)
    """Its blocks the bank lacks, stored after the call."""
    reused: int = 0
    """Real tokens taken from the cache in this call (set by :func:`~.layout.plan`)."""

    def cached(self, block_size: int) -> int:
        """Real tokens the bank holds states of: the found blocks, then the shared part of the sibling."""
        return len(self.found) * block_size + (self.tail[1] if self.tail else 0)

    def used(self, block_size: int) -> list[int]:
        """Entry ids of the blocks this call reuses (``found`` then ``tail``, as far as :attr:`reused` reaches)."""
        ids = [*self.found, *([self.tail[0]] if self.tail else [])]
        return ids[: math.ceil(self.reused / block_size)]

    def repeat(self) -> None:
        """This row repeats another row of the batch and gets its result (:func:`~.layout.copies`): every token
        counts as reused, and it neither reads nor stores blocks of its own."""
        self.found, self.tail, self.entries, self.pending = [], None, [], []
        self.reused = self.length

    def compute_whole(self) -> None:
        """This call computes the row whole and stores none of its blocks (an audited call, or one whose looked-up
        blocks left the bank): nothing is counted as reused, nothing as missed."""
        self.reused, self.pending = 0, []


@dataclass
class Group:
    """Rows computed by one call, and the column where that call's computed rectangle starts
    (:func:`~.layout.plan`)."""

    rows: list[int]
    """Indices into the request's rows, ascending."""
    split: int
    moved: list[int] = field(default_factory=list)
    """Rows (indices into :attr:`rows`) whose cached tokens sit at ``[split - reused, split)`` during the call."""


@dataclass
class PrefixRun:
    """One group's prefill: its call's arguments, its rows, the cache it starts from, and what the base model's call
    produced."""

    arguments: dict[str, Any]
    """The caller's arguments (one group), or the group's rows of them without the caller's cache (several)."""
    rows: list[Row]
    """Every row of the request; the group's are ``rows[r] for r in group.rows``."""
    group: Group
    cache: DynamicCache
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    """Gathered keys and values ``(layer, row, head, column, dim)`` and hidden states of columns ``[0, split)``."""
    keep_cache: bool
    """Whether the call returns its cache (``use_cache``); the prefix cache is filled either way."""
    moves: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    """``(row, column during the call, caller column)`` of every cached token of a moved row."""
    hidden: torch.Tensor | None = None
    """The base model's full-length final hidden states (caller's layout), once its call has returned."""

    @property
    def split(self) -> int:
        return self.group.split
