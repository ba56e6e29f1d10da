"""The sibling index: the cached blocks hanging on each parent digest, where partial-block matching looks."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class SiblingIndex:
    """Which entries hang on each parent digest, with their tokens: where token-granular matching looks.

    The index only proposes: an entry is served after its own stored parent and tokens are checked, so a stale
    index (after an eviction, ``clear()`` or a load) can cost a hit, never serve a wrong one. A parent keeps its
    ``limit`` most recently stored or used children; evicted entries are swept out as the index grows.
    """

    def __init__(self, limit: int = 32):
        self.limit = limit
        self._children: dict[bytes, dict[int, torch.Tensor]] = {}
        self._added = 0
        self._lock = threading.Lock()

    def add(self, parent: bytes, entry_id: int, tokens: torch.Tensor) -> None:
        """Record (or refresh) a child, most recent last."""
        with self._lock:
            children = self._children.setdefault(parent, {})
            children.pop(entry_id, None)
            children[entry_id] = tokens
            if len(children) > self.limit:
                children.pop(next(iter(children)))
            self._added += 1

    def discard(self, parent: bytes, entry_id: int) -> None:
        with self._lock:
            self._children.get(parent, {}).pop(entry_id, None)

    def candidates(self, parent: bytes) -> list[tuple[int, torch.Tensor]]:
        """The children of ``parent``, most recent first."""
        with self._lock:
            return list(reversed(self._children.get(parent, {}).items()))

    def sweep_if_large(self, alive: Callable[[int], bool], entries: int) -> None:
        """Drop evicted children once more were added since the last sweep than the bank holds (amortised O(1))."""
        with self._lock:
            if self._added <= max(256, entries):
                return
            for parent in list(self._children):
                kept = {i: t for i, t in self._children[parent].items() if alive(i)}
                if kept:
                    self._children[parent] = kept
                else:
                    del self._children[parent]
            self._added = 0

    def __len__(self) -> int:
        with self._lock:
            return sum(len(children) for children in self._children.values())

    def replace(self, children: list[tuple[bytes, int, torch.Tensor]]) -> None:
        with self._lock:
            self._children.clear()
        for parent, entry_id, tokens in children:
            self.add(parent, entry_id, tokens)
