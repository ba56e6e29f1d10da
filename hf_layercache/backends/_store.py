"""What the backends share: the exact key store, and the rebuild cycle of an approximate index kept over one.

Every backend keeps the exact keys, whatever its index, because three jobs need them: scores must be true cosines
(the cache's threshold decisions read them), indexes that cannot delete or insert must be rebuilt from something, and
persistence stores tensors only. Keys are ~1.5 KB per entry at dim 384, against 100+ KB for the cached hidden states
of the same entry, so the copy is cheap where it matters.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Backend, empty_result

# A dict entry id -> slot also holds two int objects, which sys.getsizeof(dict) does not count.
_INT_PAIR_BYTES = 2 * sys.getsizeof(1 << 40)
# Bound on the (queries x keys) similarity block of one exact search step, in elements.
_MAX_SIM_BLOCK = 1 << 24


class KeyStore:
    """L2-normalised float32 keys in append-only slots; each slot holds the caller's id, or -1 once removed.

    Slots move only in :meth:`keep`, so an index built over slots ``[0, n)`` stays valid while keys are appended
    and removed; a removed slot is a tombstone until the next :meth:`keep`. ``live_bits`` is a little-endian bitmap
    of the live slots, the form FAISS's ``IDSelectorBitmap`` reads.
    """

    def __init__(self, dim: int, device: torch.device):
        self.dim = dim
        self.device = device
        self.n = 0
        self.keys = torch.empty(0, dim, device=device)
        self.ids = torch.empty(0, dtype=torch.long, device=device)
        self.live_bits = np.zeros(0, dtype=np.uint8)
        self._slot_of: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def n_dead(self) -> int:
        return self.n - len(self._slot_of)

    @property
    def nbytes(self) -> int:
        tensors = self.keys.numel() * self.keys.element_size() + self.ids.numel() * self.ids.element_size()
        mapping = sys.getsizeof(self._slot_of) + len(self._slot_of) * _INT_PAIR_BYTES
        return tensors + self.live_bits.nbytes + mapping

    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        """Append normalised ``keys`` under ``ids`` in slots ``[n, n + len(ids))``; a re-added id loses its old slot."""
        id_list = ids.tolist()
        start, stop = self.n, self.n + len(id_list)
        self._reserve(stop)
        self.keys[start:stop] = keys.to(self.device)
        self.ids[start:stop] = ids.to(self.device)
        self.n = stop
        self._set_bits(np.arange(start, stop), True)
        replaced = [slot for slot in map(self._slot_of.get, id_list) if slot is not None]
        self._slot_of.update(zip(id_list, range(start, stop), strict=True))
        if len(set(id_list)) < len(id_list):  # within one call the last occurrence of an id wins
            replaced += [slot for slot, i in zip(range(start, stop), id_list, strict=True) if self._slot_of[i] != slot]
        self._kill(replaced)

    def remove(self, ids: torch.Tensor) -> None:
        popped = (self._slot_of.pop(i, None) for i in ids.tolist())
        self._kill([slot for slot in popped if slot is not None])

    def live_slots(self) -> torch.Tensor:
        return (self.ids[: self.n] >= 0).nonzero().squeeze(1)

    def keep(self, slots: torch.Tensor) -> None:
        """Renumber: slot ``i`` becomes old slot ``slots[i]`` (dead ones stay tombstones); all others are dropped."""
        self.keys, self.ids = self.keys[slots], self.ids[slots]
        self.n = len(slots)
        live = self.ids >= 0
        self.live_bits = np.packbits(live.cpu().numpy(), bitorder="little")
        self._slot_of = dict(zip(self.ids[live].tolist(), live.nonzero().squeeze(1).tolist(), strict=True))

    def shrink(self) -> None:
        """Drop the spare capacity past slot ``n`` (slots keep their numbers)."""
        self.keys, self.ids = self.keys[: self.n].clone(), self.ids[: self.n].clone()
        self.live_bits = self.live_bits[: self.n // 8 + 1].copy()

    def search(self, queries: torch.Tensor, k: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` over slots ``[start, n)`` for normalised ``queries``, padded with -inf / -1."""
        scores, ids = empty_result(queries.shape[0], k, self.device)
        if self.n <= start or queries.shape[0] == 0:
            return scores, ids
        keys, slot_ids = self.keys[start : self.n], self.ids[start : self.n]
        dead, top = slot_ids < 0, min(k, len(slot_ids))
        step = max(1, _MAX_SIM_BLOCK // len(slot_ids))
        for rows in range(0, queries.shape[0], step):
            sims = (queries[rows : rows + step] @ keys.T).clamp_(-1.0, 1.0).masked_fill_(dead, float("-inf"))
            best, idx = sims.topk(top, dim=1)
            scores[rows : rows + step, :top], ids[rows : rows + step, :top] = best, slot_ids[idx]
        return scores, ids

    def state_dict(self) -> dict[str, torch.Tensor]:
        live = self.ids[: self.n] >= 0
        return {"ids": self.ids[: self.n][live].cpu(), "keys": self.keys[: self.n][live].cpu()}

    def _reserve(self, n: int) -> None:
        if n <= len(self.ids):
            return
        # 1.25x: a bounded jump against the budget; from 8 slots, as a bank keeps an index per tenant
        capacity = max(n, len(self.ids) + len(self.ids) // 4, 8)
        keys = torch.empty(capacity, self.dim, device=self.device)
        ids = torch.full((capacity,), -1, dtype=torch.long, device=self.device)
        keys[: self.n], ids[: self.n] = self.keys[: self.n], self.ids[: self.n]
        self.keys, self.ids = keys, ids
        self.live_bits = np.concatenate([self.live_bits, np.zeros(capacity // 8 + 1 - len(self.live_bits), np.uint8)])

    def _kill(self, slots: list[int]) -> None:
        if slots:
            self.ids[torch.tensor(slots, device=self.device)] = -1
            self._set_bits(np.asarray(slots), False)

    def _set_bits(self, slots: np.ndarray, value: bool) -> None:
        masks = np.left_shift(1, slots & 7).astype(np.uint8)
        if value:
            np.bitwise_or.at(self.live_bits, slots >> 3, masks)
        else:
            np.bitwise_and.at(self.live_bits, slots >> 3, ~masks)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns of (q, c) ``scores``/``ids`` per row, best first, padded to ``k`` with -inf / -1."""
    rows, columns = scores.shape
    out_scores = np.full((rows, k), -np.inf, dtype=np.float32)
    out_ids = np.full((rows, k), -1, dtype=np.int64)
    top = min(k, columns)
    if top:
        pick = np.argpartition(-scores, top - 1, axis=1)[:, :top] if top < columns else np.indices(scores.shape)[1]
        best = np.take_along_axis(scores, pick, 1)
        order = np.argsort(-best, axis=1, kind="stable")
        out_scores[:, :top] = np.take_along_axis(best, order, 1)
        out_ids[:, :top] = np.take_along_axis(np.take_along_axis(ids, pick, 1), order, 1)
    return out_scores, out_ids


def normalised(backend: Backend, keys: torch.Tensor, what: str, device: torch.device) -> torch.Tensor:
    """Validate (n, dim) ``keys`` and return them L2-normalised in float32 on ``device``."""
    if not isinstance(keys, torch.Tensor):
        keys = torch.as_tensor(keys)
    keys = backend._check_keys(keys, what)
    keys = keys.detach().to(device, torch.float32)
    if not torch.isfinite(keys).all():
        raise ValueError(f"{type(backend).__name__}: {what} contain NaN or inf.")
    return F.normalize(keys, dim=-1)


def id_tensor(backend: Backend, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Validate ``ids`` for ``n`` keys and return them as a flat int64 CPU tensor."""
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{type(backend).__name__}: ids must be integers, got dtype {ids.dtype}.")
    if ids.numel() != n:
        raise ValueError(f"{type(backend).__name__}: {ids.numel()} ids for {n} keys.")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{type(backend).__name__}: ids must be >= 0 (-1 means 'nothing' in results).")
    return ids.to("cpu", torch.long)


def checked_state(backend: Backend, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(ids, keys)`` of a backend state dict, validated against ``backend``."""
    name = type(backend).__name__
    missing = {"ids", "keys"} - set(state)
    if missing:
        raise ValueError(f"{name}.load_state_dict: missing {sorted(missing)}; expected the keys 'ids' and 'keys'.")
    ids, keys = state["ids"], state["keys"]
    if not isinstance(ids, torch.Tensor) or not isinstance(keys, torch.Tensor):
        raise ValueError(f"{name}.load_state_dict: 'ids' and 'keys' must be tensors.")
    if not keys.is_floating_point():
        raise ValueError(f"{name}.load_state_dict: 'keys' must be floating point, got {keys.dtype}.")
    keys = backend._check_keys(keys, "state 'keys'")
    return id_tensor(backend, ids, keys.shape[0]), keys


def check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"search k must be an int >= 1, got {k!r}.")


@cache
def _rebuild_executor() -> ThreadPoolExecutor:
    """One worker for every backend in the process: rebuilds are CPU-bound, so running two at once gains nothing."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_layercache-rebuild")


class IndexedBackend(Backend):
    """An approximate index over a :class:`KeyStore`, with the bookkeeping every such index needs.

    - The index only proposes candidate slots; the store rescores them exactly, so scores are true cosines.
    - Slots the index does not cover yet (``>= self._indexed``) form a side buffer that is searched exactly.
    - Removed keys stay in the index as tombstones and are filtered out of its answers.
    - Once buffer plus tombstones exceed :meth:`_rebuild_after`, a new index is built from the live keys. With
      ``background=True`` the build runs in a worker thread (FAISS and Annoy release the GIL while building) and the
      old index plus the buffer keep answering until the next call after it finishes swaps it in.

    Subclasses implement :meth:`_build`, :meth:`_candidates` and :meth:`_rebuild_after`, and :meth:`_extend` if
    their index takes keys after it is built.
    """

    def __init__(self, dim: int, metric: str = "cosine", device: torch.device | str = "cpu", background: bool = True):
        super().__init__(dim, metric, device)
        self.background = background
        self._store = KeyStore(dim, torch.device("cpu"))
        self._index: Any = None
        self._indexed = 0
        self._pending: tuple[Future, torch.Tensor, int] | None = None

    def _build(self, keys: np.ndarray) -> Any:
        """A new index whose item ``i`` is row ``i`` of ``keys``, or None to search everything exactly for now."""
        raise NotImplementedError

    def _extend(self, index: Any, keys: np.ndarray) -> bool:
        """Append ``keys`` as the next items of ``index``; False if the index cannot grow."""
        return False

    def _candidates(self, index: Any, queries: np.ndarray, k: int) -> np.ndarray:
        """(q, c) int64 item numbers proposed for the best ``k`` live keys; -1 for none."""
        raise NotImplementedError

    def _rebuild_after(self) -> int:
        """How many buffered plus removed keys the current index may carry before it is rebuilt."""
        raise NotImplementedError

    def add(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        keys = normalised(self, keys, "keys", self._store.device)
        ids = id_tensor(self, ids, keys.shape[0])
        self._collect()
        start = self._store.n
        self._store.add(ids, keys)
        new_keys = self._store.keys[start : self._store.n].numpy()
        if self._index is not None and self._indexed == start and self._extend(self._index, new_keys):
            self._indexed = self._store.n
        self._maybe_rebuild()

    def remove(self, ids: torch.Tensor) -> None:
        self._collect()
        self._store.remove(torch.as_tensor(ids).reshape(-1))
        self._maybe_rebuild()

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        check_k(k)
        queries = normalised(self, queries, "queries", self._store.device)
        self._collect()
        scores = np.empty((queries.shape[0], 0), dtype=np.float32)
        ids = np.empty((queries.shape[0], 0), dtype=np.int64)
        if self._index is not None and self._indexed and queries.shape[0]:
            scores, ids = self._rescore(queries.numpy(), self._candidates(self._index, queries.numpy(), k), k)
        if self._store.n > self._indexed:
            buffered = self._store.search(queries, k, start=self._indexed)
            scores = np.concatenate([scores, buffered[0].numpy()], 1)
            ids = np.concatenate([ids, buffered[1].numpy()], 1)
        scores, ids = top_k(scores, ids, k)
        return torch.from_numpy(scores).to(self.device), torch.from_numpy(ids).to(self.device)

    def _rescore(self, queries: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosines and ids of the first ``k`` live candidate ``slots`` of each query (-inf / -1 for none)."""
        slot_ids = self._store.ids.numpy()
        ids = np.where(slots >= 0, slot_ids[np.maximum(slots, 0)], -1)
        if slots.shape[1] > k:  # oversampled past tombstones: keep the first k live ones, in the index's order
            first = np.argsort(ids < 0, axis=1, kind="stable")[:, :k]
            slots, ids = np.take_along_axis(slots, first, 1), np.take_along_axis(ids, first, 1)
        keys = self._store.keys.numpy()[np.maximum(slots, 0)]
        scores = np.clip(np.matmul(keys, queries[:, :, None])[:, :, 0], -1.0, 1.0)
        scores[ids < 0] = -np.inf
        return scores, ids

    def __len__(self) -> int:
        return len(self._store)

    @property
    def buffered(self) -> int:
        """Keys the index does not cover yet, searched exactly (live and removed)."""
        return self._store.n - self._indexed

    @property
    def tombstones(self) -> int:
        """Removed or replaced keys still held until the next rebuild."""
        return self._store.n_dead

    def wait(self) -> None:
        """Block until a background rebuild, if one is running, has finished and been swapped in."""
        if self._pending is not None:
            self._pending[0].result()
            self._collect()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._store.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ids, keys = checked_state(self, state)
        self.wait()
        self._store = KeyStore(self.dim, self._store.device)
        self._index, self._indexed = None, 0
        self.add(ids, keys)

    def rebuild(self) -> bool:
        """Start building a fresh index from the live keys (in the background if ``background``) unless a build is
        running; returns whether one started. The current index answers until the new one is swapped in."""
        self._collect()
        if self._pending is not None:
            return False
        self._start_rebuild()
        return True

    def compact(self) -> None:
        """Drop removed keys now, inline: renumber the slots while everything is in the exact buffer, else rebuild
        the index from the live keys; then drop spare capacity."""
        self.wait()
        if self._store.n_dead:
            live = self._store.live_slots()
            if self._index is None:  # no index refers to slot numbers yet
                self._store.keep(live)
            else:
                self._swap(self._build(self._store.keys[live].numpy()), live, self._store.n)
        self._store.shrink()

    def _maybe_rebuild(self) -> None:
        if self._pending is None and self._store.n_dead + self._store.n - self._indexed > self._rebuild_after():
            self._start_rebuild()

    def _start_rebuild(self) -> None:
        snapshot = self._store.live_slots()
        keys = self._store.keys[snapshot].numpy()  # a copy: the build never sees later changes
        if self.background:
            self._pending = (_rebuild_executor().submit(self._build, keys), snapshot, self._store.n)
        else:
            self._swap(self._build(keys), snapshot, self._store.n)

    def _collect(self) -> None:
        if self._pending is not None and self._pending[0].done():
            future, snapshot, n_then = self._pending
            self._pending = None
            self._swap(future.result(), snapshot, n_then)

    def _swap(self, index: Any, snapshot: torch.Tensor, n_then: int) -> None:
        """Install ``index`` built over ``snapshot`` slots; keys added since then go to the buffer or the index."""
        later = torch.arange(n_then, self._store.n)
        later = later[self._store.ids[n_then : self._store.n] >= 0]
        self._store.keep(torch.cat([snapshot, later]))
        self._index = index
        self._indexed = len(snapshot) if index is not None else 0
        if index is not None and len(later) and self._extend(index, self._store.keys[len(snapshot) :].numpy()):
            self._indexed = self._store.n
