"""Exact search while a bank is small, an approximate index once exact search costs more than it."""

from __future__ import annotations

from typing import Any

import torch

from ..registry import BACKENDS, register_backend
from .base import Backend
from .exact import ExactBackend

# Measured by benchmarks/lookup.py (docs/benchmarks.md, "Lookup backends"): on a 2-core CPU exact search at batch 1
# costs more than the HNSW graph beyond this many keys of dimension 384.
SWITCH_AT = 4096
# The approximate backends auto moves to, first importable one first, with the settings the benchmark chose.
APPROXIMATE = (("faiss", {"index": "HNSW32"}), ("annoy", {}))


@register_backend("auto")
class AutoBackend(Backend):
    """Exact search below ``switch_at`` keys, an approximate index from there on: the default backend.

    Exact search is exact and needs no build, but its cost grows with every key; a graph index costs tens of
    microseconds per query at any size but must be built and only finds the true nearest neighbour most of the time.
    ``switch_at`` is where the two cost the same per query, measured by ``benchmarks/lookup.py``. At that size the
    keys are handed to ``approximate`` (FAISS HNSW when faiss is installed, else Annoy, else the search stays exact),
    whose first build runs in a background thread while its exact side buffer answers, so no insert blocks on it.
    Below ``switch_at // 2`` keys the bank goes back to exact search; the gap keeps a bank that hovers around the
    threshold from rebuilding over and over.

    Args:
        switch_at: keys at which search moves to the approximate index.
        approximate: name of the registered backend to move to; default the first installed of "faiss", "annoy".
        approximate_kwargs: its backend_kwargs; default the settings measured for it (see ``APPROXIMATE``).
    """

    def __init__(
        self,
        dim: int,
        metric: str = "cosine",
        device: torch.device | str = "cpu",
        switch_at: int = SWITCH_AT,
        approximate: str | None = None,
        approximate_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(dim, metric, device)
        if not isinstance(switch_at, int) or switch_at < 2:
            raise ValueError(f"AutoBackend: switch_at must be an int >= 2, got {switch_at!r}.")
        self.switch_at = switch_at
        self._approximate = _approximate_backend(approximate, approximate_kwargs)
        self._inner: Backend = ExactBackend(dim, metric, device)

    @property
    def current(self) -> Backend:
        """The backend answering now: an :class:`ExactBackend` or the approximate one."""
        return self._inner

    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        self._inner.add(ids, keys)
        if isinstance(self._inner, ExactBackend) and self._approximate and len(self) >= self.switch_at:
            self._move_to(self._new_approximate())

    def remove(self, ids: torch.Tensor) -> None:
        self._inner.remove(ids)
        if not isinstance(self._inner, ExactBackend) and len(self) < self.switch_at // 2:
            self._move_to(ExactBackend(self.dim, self.metric, self.device))

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self._inner.search(queries, k)

    def __len__(self) -> int:
        return len(self._inner)

    @property
    def nbytes(self) -> int:
        return self._inner.nbytes

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        exact = ExactBackend(self.dim, self.metric, self.device)
        exact.load_state_dict(state)
        self._inner = exact
        if self._approximate and len(exact) >= self.switch_at:
            self._move_to(self._new_approximate())

    def _new_approximate(self) -> Backend:
        cls, kwargs = self._approximate
        return cls(self.dim, self.metric, self.device, **kwargs)

    def _move_to(self, backend: Backend) -> None:
        backend.load_state_dict(self._inner.state_dict())
        self._inner = backend


def _approximate_backend(name: str | None, kwargs: dict[str, Any] | None) -> tuple[type[Backend], dict] | None:
    """The (class, kwargs) auto moves to, or None when no approximate backend is installed."""
    if name is not None:
        measured = dict(APPROXIMATE).get(name, {})
        return BACKENDS.get(name), dict(measured if kwargs is None else kwargs)
    for candidate, measured in APPROXIMATE:
        if candidate in BACKENDS:
            return BACKENDS.get(candidate), dict(measured if kwargs is None else kwargs)
    return None
