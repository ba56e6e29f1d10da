"""Exact search while a bank is small, an IVF index sized to the bank once exact search costs more."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..registry import BACKENDS, register_backend
from .base import Backend
from .exact import ExactBackend

# Measured by benchmarks/lookup.py on a 2-core CPU, one search thread, dimension 384 (docs/benchmarks.md, "Lookup
# backends", 2026-11-23):
# - from this many keys on, a batch-1 exact search costs more than a search of the IVF index auto builds;
SWITCH_AT = 2048
# - IVF lists visited per query: the smallest count with recall@1 >= 0.99 on near-duplicate queries at 100k keys;
NPROBE = 4
# - HNSW was the other candidate: at 1M keys it built in 281 s against IVF's 39 s and found the true best key for
#   82% of near-duplicate queries against 99.6% (ef_search 64; 91% at 256), so auto plans an IVF index.
# The IVF index is re-planned (rebuilt in the background with a new list count) when the bank has grown or shrunk
# by this factor since it was planned, so lists hold ~sqrt(n) keys and a query scans ~(NPROBE + 1) * sqrt(n) keys.
REPLAN_FACTOR = 4


def ivf_index(n: int) -> str:
    """The FAISS factory string auto uses for ``n`` keys: about sqrt(n) lists, each with FAISS's 39 training points."""
    nlist = 2 ** round(math.log2(math.sqrt(max(n, 1))))
    while nlist > 1 and 39 * nlist > n:
        nlist //= 2
    return f"IVF{nlist},Flat"


@register_backend("auto")
class AutoBackend(Backend):
    """Exact search below ``switch_at`` keys, an approximate index from there on: the default backend.

    Exact search is exact and needs no build, but its cost grows with every key; an IVF index scans only the lists
    nearest the query, about (nprobe + 1) * sqrt(n) keys, but must be trained and built and misses the true best key
    now and then. ``switch_at`` is where the two cost the same per query, measured by ``benchmarks/lookup.py``. At
    that size the keys are handed to ``approximate``, whose first build runs in a background thread while its exact
    side buffer answers, so no insert waits for it. With FAISS, the index is ``ivf_index(n)`` and is rebuilt (again
    in the background) whenever the bank has grown or shrunk by ``REPLAN_FACTOR`` since, so its lists stay near
    sqrt(n) keys. Below ``switch_at // 2`` keys the bank goes back to exact search; the gap keeps a bank that hovers
    around the threshold from switching back and forth.

    Args:
        switch_at: keys at which search moves to the approximate index.
        approximate: name of the registered backend to move to; default "faiss" if installed, else "annoy"; without
            either, search stays exact.
        approximate_kwargs: its backend_kwargs. Default for FAISS ``{"nprobe": NPROBE}`` plus the planned index;
            passing them fixes the index (no re-planning).
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
        if approximate in ("auto", "exact"):
            raise ValueError(f"AutoBackend: approximate must be an approximate backend, got {approximate!r}.")
        self.switch_at = switch_at
        name = approximate or next((name for name in ("faiss", "annoy") if name in BACKENDS), None)
        self._approximate = BACKENDS.get(name) if name else None
        self._plans = name == "faiss" and approximate_kwargs is None
        self._kwargs = dict({"nprobe": NPROBE} if self._plans else approximate_kwargs or {})
        self._planned_for = 0
        self._inner: Backend = ExactBackend(dim, metric, device)

    @property
    def current(self) -> Backend:
        """The backend answering now: an :class:`ExactBackend` or the approximate one."""
        return self._inner

    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        self._inner.add(ids, keys)
        self._adapt()

    def remove(self, ids: torch.Tensor) -> None:
        self._inner.remove(ids)
        self._adapt()

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self._inner.search(queries, k)

    def __len__(self) -> int:
        return len(self._inner)

    @property
    def nbytes(self) -> int:
        return self._inner.nbytes

    def compact(self) -> None:
        self._inner.compact()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        exact = ExactBackend(self.dim, self.metric, self.device)
        exact.load_state_dict(state)
        self._inner = exact
        self._adapt()

    def _adapt(self) -> None:
        n = len(self)
        if isinstance(self._inner, ExactBackend):
            if self._approximate is not None and n >= self.switch_at:
                index = {"index": ivf_index(n)} if self._plans else {}
                self._move_to(self._approximate(self.dim, self.metric, self.device, **self._kwargs, **index))
                self._planned_for = n
        elif n < self.switch_at // 2:
            self._move_to(ExactBackend(self.dim, self.metric, self.device))
        elif self._plans and not self._planned_for / REPLAN_FACTOR < n < self._planned_for * REPLAN_FACTOR:
            self._replan(n)

    def _replan(self, n: int) -> None:
        """Rebuild the IVF index with lists for ``n`` keys; if a build is running, the next call tries again."""
        if self._inner.rebuild(index=ivf_index(n)):
            self._planned_for = n

    def _move_to(self, backend: Backend) -> None:
        backend.load_state_dict(self._inner.state_dict())
        self._inner = backend
