"""Brute-force cosine search in torch, on the bank's device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import register_backend
from .base import Backend, empty_result


@register_backend("exact")
class ExactBackend(Backend):
    """Exact nearest neighbours by one matrix product over all stored keys.

    The right choice while a bank is small: no build step, exact answers, and on a GPU a few thousand keys cost
    less than a kernel launch of the layer they stand in for. Keys are stored L2-normalised in float32.
    """

    def __init__(self, dim: int, metric: str = "cosine", device: torch.device | str = "cpu"):
        super().__init__(dim, metric, device)
        self._keys = torch.empty(0, dim, device=self.device)
        self._ids = torch.empty(0, dtype=torch.long, device=self.device)

    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        keys = self._check_keys(keys)
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(self.device)
        if ids.numel() != keys.shape[0]:
            raise ValueError(f"ExactBackend.add: {ids.numel()} ids for {keys.shape[0]} keys.")
        self.remove(ids)
        keys = F.normalize(keys.detach().to(self.device, torch.float32), dim=-1)
        self._keys = torch.cat([self._keys, keys])
        self._ids = torch.cat([self._ids, ids])

    def remove(self, ids: torch.Tensor) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(self.device)
        if ids.numel() == 0 or self._ids.numel() == 0:
            return
        keep = ~torch.isin(self._ids, ids)
        self._keys, self._ids = self._keys[keep], self._ids[keep]

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self._check_keys(queries, "queries")
        if k < 1:
            raise ValueError(f"search k must be >= 1, got {k}.")
        scores, ids = empty_result(queries.shape[0], k, self.device)
        if len(self) == 0 or queries.shape[0] == 0:
            return scores, ids
        q = F.normalize(queries.detach().to(self.device, torch.float32), dim=-1)
        sims = (q @ self._keys.T).clamp_(-1.0, 1.0)
        top = min(k, len(self))
        best, idx = sims.topk(top, dim=1)
        scores[:, :top], ids[:, :top] = best, self._ids[idx]
        return scores, ids

    def __len__(self) -> int:
        return int(self._ids.numel())

    @property
    def nbytes(self) -> int:
        return self._keys.numel() * self._keys.element_size() + self._ids.numel() * 8

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self._ids.cpu(), "keys": self._keys.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._keys = torch.empty(0, self.dim, device=self.device)
        self._ids = torch.empty(0, dtype=torch.long, device=self.device)
        self.add(state["ids"], state["keys"])
