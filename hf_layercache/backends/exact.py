"""Brute-force cosine search in torch, on the bank's device."""

from __future__ import annotations

import torch

from ..registry import register_backend
from ._store import KeyStore, check_k, checked_state, id_tensor, normalised
from .base import Backend


@register_backend("exact")
class ExactBackend(Backend):
    """Exact nearest neighbours by matrix products over all stored keys, batched over queries.

    The right choice while a bank is small: no build step, exact answers, and on a GPU a few thousand keys cost
    less than a kernel launch of the layer they stand in for. Its cost grows linearly with the number of keys (see
    docs/benchmarks.md), which is why ``"auto"`` moves to an approximate index past a measured size.
    Keys are stored L2-normalised in float32 in slots that grow geometrically (1.25x), so an insert does not copy the
    bank; removed slots are masked until they outnumber a quarter of the live keys, then compacted away.
    """

    def __init__(self, dim: int, metric: str = "cosine", device: torch.device | str = "cpu"):
        super().__init__(dim, metric, device)
        self._store = KeyStore(dim, self.device)

    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        keys = normalised(self, keys, "keys", self.device)
        self._store.add(id_tensor(self, ids, keys.shape[0]), keys)
        self._compact_if_sparse()

    def remove(self, ids: torch.Tensor) -> None:
        self._store.remove(torch.as_tensor(ids).reshape(-1))
        self._compact_if_sparse()

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        check_k(k)
        return self._store.search(normalised(self, queries, "queries", self.device), k)

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._store.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ids, keys = checked_state(self, state)
        self._store = KeyStore(self.dim, self.device)
        self.add(ids, keys)

    def compact(self) -> None:
        self._store.keep(self._store.live_slots())

    def _compact_if_sparse(self) -> None:
        if 4 * self._store.n_dead > len(self._store):
            self._store.keep(self._store.live_slots())
