"""One cache store: typed entries, found by exact digest or by key vector, bounded by a policy and a budget.

A bank knows its entry type (a :class:`~hf_layercache.entries.StoredEntry` subclass: ``ExactEntry``,
``PrefixBlock``, ...): :meth:`CacheBank.put` takes one, :meth:`CacheBank.get` returns one, and a state read from
disk is checked entry by entry with the type's ``validate`` (:meth:`CacheBank.check_state`). Each entry carries the
``namespace`` tag of the tenant it belongs to: :meth:`CacheBank.get` serves it to that tenant only. It is found by an
exact ``digest`` (bytes, for lossless strategies) or by similarity of its key vector through a
:class:`~hf_layercache.backends.base.Backend`. What a lookup decided reaches the policy as one
:class:`~hf_layercache.events.Lookup`, what a verification found as one :class:`~hf_layercache.events.Verdict`.
The bank evicts through its :class:`~hf_layercache.policies.base.Policy` *before* an insert would break
``max_entries`` or ``max_bytes``, so the budget is never exceeded, not even transiently.

Where the tensors live is the bank's :class:`~hf_layercache.storage.Storage`: each tensor of its own by default,
slots of slabs that grow with use for the prefix strategy's blocks. The cost model and the state layout are
:mod:`hf_layercache.bank_format`'s.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from .backends.base import Backend
from .bank_format import BankState, entry_bytes, trim_state, write_state
from .entries import StoredEntry, TensorEntry, check_finite
from .events import Lookup, Verdict
from .policies.base import Policy
from .storage import Storage

E = TypeVar("E", bound=StoredEntry)


@dataclass
class _Stored:
    values: dict[str, torch.Tensor]
    nbytes: int
    digest: bytes | None = None
    namespace: int = 0
    """The :func:`~hf_layercache.request.namespace_tag` of the tenant that stored it."""
    handle: Any = None
    """The storage's handle of the entry's place (a slot), released with it."""


_outside_inference_mode = torch.inference_mode(False)
"""Stores run outside inference mode whatever the caller's: entries and index tensors outlive the request, and a later
call outside ``torch.inference_mode()`` (a verdict recorded in an entry, ``clear()``) updates them in place, which
PyTorch refuses on inference tensors. Stored tensors that are inference tensors are copied."""


class CacheBank(Generic[E]):
    """Entries of one layer (or one layer stack), with their lookup structures and eviction bookkeeping.

    Thread-safe: every public method holds the bank's :attr:`lock`, so one model can serve many threads.
    """

    def __init__(
        self,
        name: str,
        policy: Policy,
        backend: Backend | None = None,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        entry_type: type[E] = TensorEntry,
        expected: Mapping[str, Any] | None = None,
        storage: Storage | None = None,
        digests_required: bool = False,
    ):
        """``expected``: what ``entry_type.validate`` checks a loaded entry against (shapes the model implies);
        ``digests_required``: entries are reachable by digest only, so a saved entry without one is refused."""
        self.name = name
        self.policy = policy
        self.backend = backend
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entry_type = entry_type
        self.expected = dict(expected or {})
        self.storage = storage if storage is not None else Storage()
        self.digests_required = digests_required
        self._entries: dict[int, _Stored] = {}
        self._by_digest: dict[bytes, int] = {}
        self._tenants: dict[int, int] = {}
        """Entries per namespace tag."""
        self._next_id = 0
        self._nbytes = 0
        self.lock = threading.RLock()
        """Held by every method; hold it too while reading tensors out of entries a concurrent insert may evict and
        whose place it may reuse (slots)."""

    @property
    def device(self) -> torch.device | None:
        return self.storage.device

    @property
    def storage_dtype(self) -> torch.dtype | None:
        return self.storage.dtype

    # --- lookup ---------------------------------------------------------------------------------------------------
    def find(self, digest: bytes) -> int | None:
        with self.lock:
            return self._by_digest.get(digest)

    def search(self, keys: torch.Tensor, k: int = 1, namespace: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most similar entries per key, best first (id -1 where there are fewer); with ``namespace``,
        among that tenant's entries only. The backend searches all tenants' keys, so the search widens (4x at a
        time, up to the whole bank) until every key has ``k`` of its tenant's: other tenants' entries never crowd a
        tenant's own nearest entry out."""
        if self.backend is None:
            raise RuntimeError(f"Bank {self.name!r} has no similarity backend.")
        with self.lock:
            if namespace is None:
                found = self.backend.search(keys, k)
                self._fit()  # a background rebuild swapped in by the search may have grown the index
                return found
            wanted = min(k, self._tenants.get(namespace, 0))
            width = k
            while True:
                scores, ids = self.backend.search(keys, min(width, len(self._entries)) or 1)
                kept = [self._of_namespace(s, i, namespace, k) for s, i in zip(scores, ids, strict=True)]
                if all(int((row[1] >= 0).sum()) >= wanted for row in kept) or width >= len(self._entries):
                    self._fit()
                    return torch.stack([row[0] for row in kept]), torch.stack([row[1] for row in kept])
                width *= 4

    def _of_namespace(
        self, scores: torch.Tensor, ids: torch.Tensor, namespace: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One key's results cut to ``namespace``'s entries, padded to ``k`` with id -1."""
        keep = [j for j, entry_id in enumerate(ids.tolist()) if self._namespace_of(entry_id) == namespace][:k]
        out_scores = torch.full((k,), -1.0, dtype=scores.dtype)
        out_ids = torch.full((k,), -1, dtype=ids.dtype)
        out_scores[: len(keep)], out_ids[: len(keep)] = scores[keep].cpu(), ids[keep].cpu()
        return out_scores, out_ids

    def _namespace_of(self, entry_id: int) -> int | None:
        stored = self._entries.get(entry_id)
        return stored.namespace if stored is not None else None

    def get(self, entry_id: int, namespace: int | None = None) -> E | None:
        """The entry (its tensors are the stored ones); ``None`` when it is gone or (with ``namespace``) belongs to
        another tenant."""
        with self.lock:
            stored = self._entries.get(entry_id)
            if stored is None or (namespace is not None and stored.namespace != namespace):
                return None
            return self.entry_type.from_tensors(stored.values)

    def holds(self, entry_id: int, name: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (field ``name`` of the entry as it was read) is still that entry's: it was neither
        evicted nor its place handed to another entry since. Call under :attr:`lock`."""
        stored = self._entries.get(entry_id)
        return stored is not None and stored.values.get(name) is tensor

    def update(self, entry_id: int, change: Callable[[E], None]) -> bool:
        """Apply ``change`` to a stored entry (its tensors, in place) under the bank's lock: a verdict or prediction
        recorded in the entry. ``False`` when the entry is gone."""
        with self.lock:
            stored = self._entries.get(entry_id)
            if stored is None:
                return False
            change(self.entry_type.from_tensors(stored.values))
            return True

    def items(self) -> list[tuple[int, E]]:
        """Every entry's id and entry, in insertion order (a snapshot of the list)."""
        with self.lock:
            return [(entry_id, self.entry_type.from_tensors(s.values)) for entry_id, s in self._entries.items()]

    def record(self, lookup: Lookup) -> None:
        """Tell the policy what a lookup decided (entries evicted meanwhile are skipped)."""
        with self.lock:
            for entry_id, similarity in lookup.served:
                if entry_id in self._entries:
                    self.policy.on_hit(entry_id, similarity)
            for _ in range(lookup.missed):
                self.policy.on_miss()

    def record_verdict(self, verdict: Verdict) -> None:
        """Tell the policy what verifying an entry found (its error: the divergence policy drops entries whose
        verified error grows)."""
        with self.lock:
            if verdict.entry_id is not None and verdict.entry_id in self._entries:
                self.policy.on_error(verdict.entry_id, verdict.error)

    # --- insert / remove ------------------------------------------------------------------------------------------
    @_outside_inference_mode
    def put(
        self,
        entry: E,
        digest: bytes | None = None,
        key: torch.Tensor | None = None,
        cost: float = 0.0,
        namespace: int = 0,
    ) -> int | None:
        """Store an entry of tenant ``namespace`` and return its id, or ``None`` when it alone is larger than the
        byte budget."""
        prepared = self.storage.prepare(entry.to_tensors())  # casts and copies, outside the lock
        with self.lock:
            if digest is not None and digest in self._by_digest:
                self._remove([self._by_digest[digest]])
            values, handle, extra = self.storage.place(prepared)
            nbytes = entry_bytes(values, 0 if key is None else key.numel()) + extra
            if self.max_bytes is not None and nbytes > self.max_bytes:
                self.storage.release(handle)
                return None
            self._make_room(nbytes)  # the new entry's place is charged first, so the room made covers all of it
            entry_id = self._next_id
            self._next_id += 1
            self._insert(entry_id, _Stored(values, nbytes, digest, namespace, handle))
            self.policy.on_insert(entry_id, nbytes, cost)
            if key is not None and self.backend is not None:
                self.backend.add(torch.tensor([entry_id]), key.reshape(1, -1))
                self._fit()
            return entry_id if entry_id in self._entries else None

    def _insert(self, entry_id: int, stored: _Stored) -> None:
        self._entries[entry_id] = stored
        self._count_tenant(stored.namespace, 1)
        self._nbytes += stored.nbytes
        if stored.digest is not None:
            self._by_digest[stored.digest] = entry_id

    def remove(self, entry_id: int) -> None:
        with self.lock:
            self._remove([entry_id])

    def clear(self) -> None:
        with self.lock:
            self._remove(list(self._entries))

    def _remove(self, entry_ids: list[int]) -> None:
        """Drop entries (unknown ids are ignored); the backend hears of them in one call, so clearing or evicting
        many costs one index update (or rebuild), not one per entry."""
        removed = [i for i in dict.fromkeys(entry_ids) if i in self._entries]
        for entry_id in removed:
            stored = self._entries.pop(entry_id)
            self._count_tenant(stored.namespace, -1)
            self._nbytes -= stored.nbytes
            self.storage.release(stored.handle)
            if stored.digest is not None:
                self._by_digest.pop(stored.digest, None)
        if removed and self.backend is not None:
            self.backend.remove(torch.tensor(removed))
        for entry_id in removed:
            self.policy.on_remove(entry_id)

    def _make_room(self, nbytes: int, incoming: int = 1) -> None:
        """Evict until ``incoming`` more entries of ``nbytes`` fit the budget (``0, 0``: until the bank fits it).

        An index may hold bytes for removed keys (tombstones, an unbuilt buffer, spare slots) until it rebuilds, and
        evicting live entries does not free those; so the backend first compacts, once, then eviction frees what is
        still needed plus a sixteenth of the budget, so the next inserts fit without another round."""
        if self._over(nbytes, incoming) and self.backend is not None and self.max_bytes is not None:
            self.backend.compact()
        while self._entries and self._over(nbytes, incoming):
            needed = 0 if self.max_bytes is None else self.nbytes + nbytes - self.max_bytes + self.max_bytes // 16
            victims = [v for v in self.policy.victims(needed) if v in self._entries]
            if not victims:
                raise RuntimeError(f"Policy {type(self.policy).__name__} named no existing entry to evict.")
            self._remove(victims)

    def _over(self, nbytes: int, incoming: int) -> bool:
        return (self.max_entries is not None and len(self._entries) + incoming > self.max_entries) or (
            self.max_bytes is not None and self.nbytes + nbytes > self.max_bytes
        )

    def _fit(self) -> None:
        """Back within the byte budget after the backend grew on its own (slots added, an index built or swapped)."""
        if self.max_bytes is not None and self.nbytes > self.max_bytes:
            self._make_room(0, incoming=0)

    # --- size -----------------------------------------------------------------------------------------------------
    def namespace_counts(self) -> dict[int, int]:
        """Entries per tenant tag."""
        with self.lock:
            return dict(self._tenants)

    def _count_tenant(self, namespace: int, change: int) -> None:
        count = self._tenants.get(namespace, 0) + change
        if count:
            self._tenants[namespace] = count
        else:
            self._tenants.pop(namespace, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes held: stored tensors and their places, per-entry bookkeeping, and the backend's index beyond the raw
        keys."""
        index_bytes = self.backend.nbytes if self.backend is not None else 0
        return self._nbytes + max(0, index_bytes - 4 * self._key_dim() * len(self._entries))

    def _key_dim(self) -> int:
        return self.backend.dim if self.backend is not None else 0

    # --- persistence ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """All entries, digests, namespaces, policy and backend state as named tensors, nothing else (safe to load
        from disk; the layout is :func:`~hf_layercache.bank_format.write_state`'s). Each tensor has a storage of its
        own (safetensors refuses shared ones)."""
        with self.lock:
            entries = (
                (entry_id, self.storage.export(s.values), s.digest, s.namespace)
                for entry_id, s in sorted(self._entries.items())
            )
            backend = self.backend.state_dict() if self.backend is not None else None
            return write_state(entries, self.policy.state_dict(), backend)

    def check_state(self, state: dict[str, torch.Tensor]) -> BankState:
        """``ValueError`` naming what is wrong unless ``state`` is one this bank could have written: its structure,
        every entry (the entry type's ``validate`` against :attr:`expected`, no NaN or infinity) and the policy's
        books. Returns it taken apart."""
        parsed = BankState.parse(state)
        for entry_id, values in parsed.entries.items():
            try:
                self.entry_type.validate(values, **self.expected)
                check_finite(values)
                if self.digests_required and parsed.digests[entry_id] is None:
                    raise ValueError("it has no digest, and this bank finds entries by digest only.")
            except ValueError as err:
                raise ValueError(f"entry {entry_id}: {err}") from None
        self._check_policy(parsed)
        return parsed

    def _check_policy(self, parsed: BankState) -> None:
        """``ValueError`` unless the saved policy state, loaded into a copy of this bank's policy, keeps the books of
        exactly the saved entries: a policy that knew none of them would name no victim, and every later insert
        would fail."""
        probe = copy.deepcopy(self.policy)
        probe.load_state_dict(parsed.policy)
        missing = [entry_id for entry_id in parsed.entries if entry_id not in probe]
        if missing or len(probe) != len(parsed.entries):
            raise ValueError(
                f"the policy state tracks {len(probe)} entries, not the bank's {len(parsed.entries)} "
                f"(e.g. entry {missing[0] if missing else '?'} is not among them)."
            )

    def trim_state(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Saved ``state`` cut to this bank's budget by its policy before any entry is read (see
        :func:`~hf_layercache.bank_format.trim_state`)."""
        return trim_state(state, self.policy, self.max_entries, self.max_bytes, self._key_dim())

    @_outside_inference_mode
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the content with ``state`` (checked before with :meth:`check_state`); the entries land in this
        bank's storage."""
        parsed = BankState.parse(state)
        with self.lock:
            self.clear()
            for entry_id, values in parsed.entries.items():
                placed, handle, extra = self.storage.place(self.storage.prepare(values))
                nbytes = entry_bytes(placed, self._key_dim()) + extra
                digest, namespace = parsed.digests[entry_id], parsed.namespaces[entry_id]
                self._insert(entry_id, _Stored(placed, nbytes, digest, namespace, handle))
            self._next_id = max(parsed.entries, default=-1) + 1
            self.policy.load_state_dict(parsed.policy)
            if self.backend is not None:
                self.backend.load_state_dict(parsed.backend)
            self._make_room(0, incoming=0)  # a cache saved under a larger budget is cut to this one, by the policy
