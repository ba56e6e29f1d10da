"""Spotify's Annoy: a forest of random-projection trees."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from annoy import AnnoyIndex

from ..registry import register_backend
from ._store import IndexedBackend


@register_backend("annoy")
class AnnoyBackend(IndexedBackend):
    """Annoy's forest of random-projection trees: small, quick to query, and **immutable once built**.

    Because an Annoy index takes no keys after ``build()`` and deletes none, this backend keeps new keys in an exact
    side buffer that every search also scans, and keeps removed keys in the forest as tombstones that searches skip
    (by asking Annoy for as many extra neighbours as there are tombstones). When buffered plus removed keys exceed
    ``buffer_size``, a new forest is built from all live keys; with ``background=True`` (the default) that happens in
    a worker thread, and the old forest plus the buffer keep answering until it is ready. Scores are exact cosines,
    recomputed from the stored keys. Annoy runs on the CPU only; on another device results are moved there.

    Args:
        n_trees: trees in the forest; more give better recall, a bigger index and a slower build.
        search_k: nodes inspected per query; -1 uses Annoy's default of n_trees times the neighbours asked for.
        buffer_size: buffered plus removed keys that trigger a rebuild. Every search scans the buffer exactly, so a
            larger buffer means fewer rebuilds but slower searches.
        background: rebuild in a worker thread (True) or inline in the add/remove that crosses ``buffer_size``.
    """

    def __init__(
        self,
        dim: int,
        metric: str = "cosine",
        device: torch.device | str = "cpu",
        n_trees: int = 16,
        search_k: int = -1,
        buffer_size: int = 1024,
        background: bool = True,
    ):
        super().__init__(dim, metric, device, background)
        if not isinstance(n_trees, int) or n_trees < 1:
            raise ValueError(f"AnnoyBackend: n_trees must be a positive int, got {n_trees!r}.")
        if not isinstance(search_k, int) or not (search_k == -1 or search_k > 0):
            raise ValueError(f"AnnoyBackend: search_k must be -1 or a positive int, got {search_k!r}.")
        if not isinstance(buffer_size, int) or buffer_size < 0:
            raise ValueError(f"AnnoyBackend: buffer_size must be an int >= 0, got {buffer_size!r}.")
        self.n_trees, self.search_k, self.buffer_size = n_trees, search_k, buffer_size

    @property
    def nbytes(self) -> int:
        """Key store plus the forest: one node of 12 + 4 * dim bytes per item and, per tree, about 3 * n / (dim + 2)
        split and leaf nodes (fitted to the sizes of saved Annoy files)."""
        n = self._indexed if self._index is not None else 0
        nodes = n + self.n_trees * 3 * n // (self.dim + 2)
        return self._store.nbytes + nodes * (12 + 4 * self.dim)

    def _build(self, keys: np.ndarray) -> Any:
        if not len(keys):
            return None
        index = AnnoyIndex(self.dim, "angular")
        for start in range(0, len(keys), 4096):  # lists are read faster than numpy rows; in chunks to bound memory
            for item, key in enumerate(keys[start : start + 4096].tolist(), start):
                index.add_item(item, key)
        index.build(self.n_trees)
        return index

    def _candidates(self, index: Any, queries: np.ndarray, k: int) -> np.ndarray:
        want = k + self._store.n_dead
        found = np.full((len(queries), want), -1, dtype=np.int64)
        for row, query in enumerate(queries.tolist()):  # Annoy reads lists faster than numpy rows
            items = index.get_nns_by_vector(query, want, search_k=self.search_k)
            found[row, : len(items)] = items
        return found

    def _rebuild_after(self) -> int:
        return self.buffer_size
