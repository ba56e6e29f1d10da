"""The backend contract: a similarity index over key vectors.

A backend only maps key vectors to entry ids; the values (tensors) live in the :class:`~hf_layercache.bank.CacheBank`.
Scores are cosine similarities in [-1, 1] (keys are compared after L2 normalisation), higher is more similar.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Backend(ABC):
    """Similarity index over ``dim``-dimensional keys, each carrying an int64 id chosen by the caller.

    Subclasses are built as ``cls(dim, metric="cosine", device=..., **backend_kwargs)`` and must pass
    the shared conformance suite in :mod:`hf_layercache.testing`.
    """

    def __init__(self, dim: int, metric: str = "cosine", device: torch.device | str = "cpu"):
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"Backend dim must be a positive int, got {dim!r}.")
        if metric != "cosine":
            raise ValueError(f"Backend metric {metric!r} is not supported; allowed: 'cosine'.")
        self.dim = dim
        self.metric = metric
        self.device = torch.device(device)

    @abstractmethod
    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        """Insert ``keys`` (n, dim) under ``ids`` (n,) int64. Re-adding an existing id replaces its key."""

    @abstractmethod
    def remove(self, ids: torch.Tensor) -> None:
        """Forget ``ids``; unknown ids are ignored."""

    @abstractmethod
    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scores, ids)``, each (q, k), best first; ids are -1 (score -inf) where there is nothing."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of live keys."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the index (keys and structure), counted against the memory budget."""
        return 0

    def compact(self) -> None:  # noqa: B027 - optional: an index without reclaimable space has nothing to do
        """Release now, synchronously, what removed keys and spare capacity still hold (tombstones, buffers, slots).

        A bank over its memory budget calls this before evicting more: an index that keeps removed keys until a
        later rebuild would otherwise make every eviction free too little, and the bank would empty itself."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that rebuild the index with :meth:`load_state_dict` (tensors only, no Python objects): at least
        ``ids`` (n,) and ``keys`` (n, dim), which a bank saves for each tenant's index and loads back, cut by tenant."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the index content with ``state`` from :meth:`state_dict`."""

    def _check_keys(self, keys: torch.Tensor, what: str = "keys") -> torch.Tensor:
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__}: {what} must have shape (n, {self.dim}), got {tuple(keys.shape)}.")
        return keys


def empty_result(q: int, k: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The answer for 'nothing found': scores -inf, ids -1."""
    scores = torch.full((q, k), float("-inf"), device=device)
    ids = torch.full((q, k), -1, dtype=torch.long, device=device)
    return scores, ids
