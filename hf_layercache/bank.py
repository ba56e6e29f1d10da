"""One cache store: typed entries, found by exact digest or by key vector, bounded by a policy and a budget.

A bank knows its entry type (a :class:`~hf_layercache.entries.StoredEntry` subclass: ``ExactEntry``,
``PrefixBlock``, ...): :meth:`CacheBank.put` takes one, :meth:`CacheBank.get` returns one, and a state read from
disk is checked entry by entry with the type's ``validate`` (:meth:`CacheBank.check_state`). Each entry carries the
``namespace`` tag of the tenant it belongs to: :meth:`CacheBank.get` serves it to that tenant only. It is found by an
exact ``digest`` (bytes, for lossless strategies) or by similarity of its key vector through a
:class:`~hf_layercache.backends.base.Backend`: each tenant has an index of its own, so what a tenant's search does
(how many searches, over which keys) never depends on what other tenants stored. What a lookup decided reaches the
policy as one
:class:`~hf_layercache.events.Lookup`, what a verification found as one :class:`~hf_layercache.events.Verdict`.
The bank evicts through its :class:`~hf_layercache.policies.base.Policy` *before* an insert would break
``max_entries`` or ``max_bytes``, so the budget is never exceeded, not even transiently; with a
``namespace_quota``, a tenant at its share of the budget evicts its own entries, never another tenant's.

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

from .backends.base import Backend, empty_result
from .bank_format import BankState, entry_bytes, merge_index_states, split_index_state, trim_state, write_state
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
    entry: Any = None
    """The entry as last read, kept for entry types whose ``decoded_once`` says reading it again gives the same."""


@dataclass
class _Tenant:
    """One namespace's share of a bank: how much it holds, and its own similarity index."""

    entries: int = 0
    nbytes: int = 0
    """Bytes of its entries (as :func:`~hf_layercache.bank_format.entry_bytes` counts them)."""
    index: Backend | None = None
    """Its keys, in a copy of the bank's backend made when it stores its first key; dropped with its last entry."""
    index_extra: int = 0
    """What its index holds beyond its raw keys (slots, a forest), as read after the index last changed."""


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
        namespace_quota: float | None = None,
    ):
        """``backend``: an empty index, the template each tenant's index is copied from (it never holds keys itself);
        ``expected``: what ``entry_type.validate`` checks a loaded entry against (shapes the model implies);
        ``digests_required``: entries are reachable by digest only, so a saved entry without one is refused;
        ``namespace_quota``: the share (0 to 1] of ``max_entries`` and ``max_bytes`` one tenant may hold."""
        if backend is not None and len(backend):
            raise ValueError(f"Bank {name!r}: the backend must be empty, it is the template of every tenant's index.")
        if namespace_quota is not None and not 0 < namespace_quota <= 1:
            raise ValueError(f"Bank {name!r}: namespace_quota must be in (0, 1], got {namespace_quota!r}.")
        self.name = name
        self.policy = policy
        self.backend = backend
        self.namespace_quota = namespace_quota
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entry_type = entry_type
        self.expected = dict(expected or {})
        self.storage = storage if storage is not None else Storage()
        self.digests_required = digests_required
        self._entries: dict[int, _Stored] = {}
        self._by_digest: dict[bytes, int] = {}
        self._tenants: dict[int, _Tenant] = {}
        """Per namespace tag with entries: its share and its index."""
        self._next_id = 0
        self._nbytes = 0
        self._index_extra = 0
        """The tenants' ``index_extra``, summed."""
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

    def find_entry(self, digest: bytes, namespace: int | None = None) -> tuple[int, E] | None:
        """``find`` and ``get`` under one hold of the lock: the entry of ``digest`` and its id, or ``None`` when
        there is none (or, with ``namespace``, it belongs to another tenant)."""
        with self.lock:
            entry_id = self._by_digest.get(digest)
            if entry_id is None:
                return None
            stored = self._entries.get(entry_id)
            if stored is None or (namespace is not None and stored.namespace != namespace):
                return None
            return entry_id, self._read(stored)

    def search(self, keys: torch.Tensor, k: int = 1, namespace: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most similar entries per key, best first (id -1, score -inf where there are fewer); with
        ``namespace``, among that tenant's entries only.

        A tenant's search is one search of its own index: other tenants' entries can neither be served nor crowd its
        nearest entry out (also not from an approximate index, whose lists or trees they would shape), and its work
        (searches, keys scanned) is the same whatever they stored, so its latency tells nothing of their inputs.
        Without ``namespace`` every tenant's index is searched and the results merged (for tools and tests)."""
        if self.backend is None:
            raise RuntimeError(f"Bank {self.name!r} has no similarity backend.")
        with self.lock:
            if namespace is not None:
                tenant = self._tenants.get(namespace)
                if tenant is None or tenant.index is None:
                    return empty_result(keys.shape[0], k)
                found = tenant.index.search(keys, k)
                self._index_changed(tenant)  # a background rebuild swapped in by the search may have grown it
                self._fit(namespace)
                return found
            tenants = [t for t in self._tenants.values() if t.index is not None]
            if not tenants:
                return empty_result(keys.shape[0], k)
            results = [t.index.search(keys, k) for t in tenants]  # type: ignore[union-attr]
            scores = torch.cat([found[0].cpu() for found in results], 1)
            ids = torch.cat([found[1].cpu() for found in results], 1)
            for tenant in tenants:
                self._index_changed(tenant)
            self._fit()
            best = scores.topk(k, dim=1)
            return best.values, ids.gather(1, best.indices)

    def get(self, entry_id: int, namespace: int | None = None) -> E | None:
        """The entry (its tensors are the stored ones); ``None`` when it is gone or (with ``namespace``) belongs to
        another tenant."""
        with self.lock:
            stored = self._entries.get(entry_id)
            if stored is None or (namespace is not None and stored.namespace != namespace):
                return None
            return self._read(stored)

    def _read(self, stored: _Stored) -> E:
        """The entry of ``stored``. An entry type whose ``decoded_once`` is true holds nothing beyond its stored
        tensors that reading them again could change (no field decoded from a tensor that :meth:`update` writes):
        it is read once and the same object returned from then on (``tolist()`` on a cold hit costs microseconds)."""
        entry = stored.entry
        if entry is None:
            entry = self.entry_type.from_tensors(stored.values)
            if getattr(self.entry_type, "decoded_once", False):
                stored.entry = entry
        return entry

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
            stored.entry = None  # read again from the changed tensors
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
            quota = self._quota_bytes()
            limit = quota if quota is not None else self.max_bytes  # an entry larger than its tenant may hold
            if limit is not None and nbytes > limit:
                self.storage.release(handle)
                return None
            # the new entry's place is charged first, so the room made covers all of it
            self._make_room(nbytes, namespace=namespace)
            entry_id = self._next_id
            self._next_id += 1
            self._insert(entry_id, _Stored(values, nbytes, digest, namespace, handle))
            self.policy.on_insert(entry_id, nbytes, cost)
            if key is not None and self.backend is not None:
                tenant = self._tenants[namespace]
                if tenant.index is None:
                    tenant.index = copy.deepcopy(self.backend)
                tenant.index.add(torch.tensor([entry_id]), key.reshape(1, -1))
                self._index_changed(tenant)
                self._fit(namespace)
            return entry_id if entry_id in self._entries else None

    def _insert(self, entry_id: int, stored: _Stored) -> None:
        self._entries[entry_id] = stored
        tenant = self._tenants.setdefault(stored.namespace, _Tenant())
        tenant.entries += 1
        tenant.nbytes += stored.nbytes
        self._index_changed(tenant)
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
        """Drop entries (unknown ids are ignored); each tenant's index hears of its own in one call, so clearing or
        evicting many costs one index update (or rebuild) per tenant, not one per entry. A tenant's index goes with
        its last entry."""
        removed: dict[int, list[int]] = {}
        for entry_id in dict.fromkeys(entry_ids):
            stored = self._entries.pop(entry_id, None)
            if stored is None:
                continue
            removed.setdefault(stored.namespace, []).append(entry_id)
            tenant = self._tenants[stored.namespace]
            tenant.entries -= 1
            tenant.nbytes -= stored.nbytes
            self._nbytes -= stored.nbytes
            self.storage.release(stored.handle)
            if stored.digest is not None:
                self._by_digest.pop(stored.digest, None)
        for namespace, ids in removed.items():
            tenant = self._tenants[namespace]
            if tenant.index is not None and tenant.entries:
                tenant.index.remove(torch.tensor(ids))
            if tenant.entries:
                self._index_changed(tenant)
            else:
                self._index_extra -= tenant.index_extra
                del self._tenants[namespace]
        for ids in removed.values():
            for entry_id in ids:
                self.policy.on_remove(entry_id)

    def _make_room(self, nbytes: int, incoming: int = 1, namespace: int | None = None) -> None:
        """Evict until ``incoming`` more entries of ``nbytes`` fit the budget (``0, 0``: until the bank fits it) and,
        with a quota, tenant ``namespace``'s share of it: first that tenant's own entries down to its quota, then
        anyone's (by the policy) down to the bank's budget.

        An index may hold bytes for removed keys (tombstones, an unbuilt buffer, spare slots) until it rebuilds, and
        evicting live entries does not free those; so the index first compacts, once, then eviction frees what is
        still needed plus a sixteenth of the budget, so the next inserts fit without another round."""
        if namespace is not None and self.namespace_quota is not None:
            self._make_tenant_room(namespace, nbytes, incoming)
        if self._over(nbytes, incoming) and self.max_bytes is not None:
            for tenant in list(self._tenants.values()):
                self._compact(tenant)
        while self._entries and self._over(nbytes, incoming):
            needed = 0 if self.max_bytes is None else self.nbytes + nbytes - self.max_bytes + self.max_bytes // 16
            victims = [v for v in self.policy.victims(needed) if v in self._entries]
            if not victims:
                raise RuntimeError(f"Policy {type(self.policy).__name__} named no existing entry to evict.")
            self._remove(victims)

    def _make_tenant_room(self, namespace: int, nbytes: int, incoming: int) -> None:
        """Evict tenant ``namespace``'s own entries, in the policy's order, until ``incoming`` more of ``nbytes``
        fit its quota: a tenant filling the bank pushes out its own entries, not another tenant's."""
        max_entries, max_bytes = self._quota_entries(), self._quota_bytes()
        tenant = self._tenants.get(namespace)
        if tenant is None or not self._tenant_over(tenant, nbytes, incoming):
            return
        if max_bytes is not None:
            self._compact(tenant)
        while tenant.entries and self._tenant_over(tenant, nbytes, incoming):
            # what is over the quota plus a sixteenth of it, so the next inserts fit without another walk
            count = 1 if max_entries is None else tenant.entries + incoming - max_entries + max_entries // 16
            size = 0 if max_bytes is None else tenant.nbytes + tenant.index_extra + nbytes - max_bytes + max_bytes // 16
            self._remove(self._victims_of(namespace, count, size))

    def _victims_of(self, namespace: int, count: int, nbytes_needed: int) -> list[int]:
        """Tenant ``namespace``'s entries the policy would evict first: at least ``count`` (and one), and until
        ``nbytes_needed`` are freed. The policy's whole order is walked for them (a sorted copy for scored
        policies): paid by a tenant at its quota once per sixteenth of its quota."""
        out, freed = [], 0
        for entry_id in self.policy.eviction_order():
            stored = self._entries.get(entry_id)
            if stored is None or stored.namespace != namespace:
                continue
            out.append(entry_id)
            freed += stored.nbytes
            if len(out) >= count and freed >= nbytes_needed:
                break
        if not out:
            raise RuntimeError(f"Policy {type(self.policy).__name__} tracks none of a tenant's entries.")
        return out

    def _over(self, nbytes: int, incoming: int) -> bool:
        return (self.max_entries is not None and len(self._entries) + incoming > self.max_entries) or (
            self.max_bytes is not None and self.nbytes + nbytes > self.max_bytes
        )

    def _tenant_over(self, tenant: _Tenant, nbytes: int, incoming: int) -> bool:
        max_entries, max_bytes = self._quota_entries(), self._quota_bytes()
        return (max_entries is not None and tenant.entries + incoming > max_entries) or (
            max_bytes is not None and tenant.nbytes + tenant.index_extra + nbytes > max_bytes
        )

    def _quota_entries(self) -> int | None:
        if self.namespace_quota is None or self.max_entries is None:
            return None
        return max(1, int(self.namespace_quota * self.max_entries))

    def _quota_bytes(self) -> int | None:
        if self.namespace_quota is None or self.max_bytes is None:
            return None
        return int(self.namespace_quota * self.max_bytes)

    def _fit(self, namespace: int | None = None) -> None:
        """Back within the byte budget (and tenant ``namespace``'s quota) after an index grew on its own (slots
        added, an index built or swapped)."""
        if namespace is not None and self.namespace_quota is not None:
            self._make_tenant_room(namespace, 0, 0)
        if self.max_bytes is not None and self.nbytes > self.max_bytes:
            self._make_room(0, incoming=0)

    def _compact(self, tenant: _Tenant) -> None:
        if tenant.index is not None:
            tenant.index.compact()
            self._index_changed(tenant)

    def _index_changed(self, tenant: _Tenant) -> None:
        """Read again what the tenant's index holds beyond its raw keys (after any call that may change it: the
        bank's byte count is then a sum kept up to date, not a walk over every tenant's index)."""
        extra = 0
        if tenant.index is not None:
            extra = max(0, tenant.index.nbytes - 4 * self._key_dim() * tenant.entries)
        self._index_extra += extra - tenant.index_extra
        tenant.index_extra = extra

    # --- size -----------------------------------------------------------------------------------------------------
    def namespace_counts(self) -> dict[int, int]:
        """Entries per tenant tag."""
        with self.lock:
            return {namespace: tenant.entries for namespace, tenant in self._tenants.items()}

    def count(self, namespace: int) -> int:
        """Entries of tenant ``namespace``: what a strategy sizes that tenant's search by (never the bank's total,
        which other tenants' entries make)."""
        with self.lock:
            tenant = self._tenants.get(namespace)
            return tenant.entries if tenant is not None else 0

    def namespace_nbytes(self, namespace: int) -> int:
        """Bytes tenant ``namespace`` holds: its entries and what its index holds beyond their keys (what its
        quota bounds)."""
        with self.lock:
            tenant = self._tenants.get(namespace)
            return tenant.nbytes + tenant.index_extra if tenant is not None else 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes held: stored tensors and their places, per-entry bookkeeping, and the tenants' indexes beyond the
        raw keys."""
        return self._nbytes + self._index_extra

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
            indexes = [t.index.state_dict() for t in self._tenants.values() if t.index is not None]
            backend = merge_index_states(indexes, self._key_dim()) if self.backend is not None else None
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
        indexes = self._load_indexes(parsed) if self.backend is not None else {}  # a refused state changes nothing
        with self.lock:
            self.clear()
            for entry_id, values in parsed.entries.items():
                placed, handle, extra = self.storage.place(self.storage.prepare(values, owned=True))
                nbytes = entry_bytes(placed, self._key_dim()) + extra
                digest, namespace = parsed.digests[entry_id], parsed.namespaces[entry_id]
                self._insert(entry_id, _Stored(placed, nbytes, digest, namespace, handle))
            self._next_id = max(parsed.entries, default=-1) + 1
            self.policy.load_state_dict(parsed.policy)
            for namespace, index in indexes.items():
                self._tenants[namespace].index = index
                self._index_changed(self._tenants[namespace])
            for namespace in list(self._tenants):  # a cache saved under a larger budget or quota is cut to this
                self._fit(namespace)
            self._make_room(0, incoming=0)

    def _load_indexes(self, parsed: BankState) -> dict[int, Backend]:
        """Each tenant's index, rebuilt from the saved keys of its entries (a warm cache holds every tenant's keys
        together, as one index held them before tenants had their own)."""
        indexes: dict[int, Backend] = {}
        for namespace, index_state in split_index_state(parsed.backend, parsed.namespaces).items():
            index = copy.deepcopy(self.backend)
            index.load_state_dict(index_state)  # type: ignore[union-attr]
            indexes[namespace] = index  # type: ignore[assignment]
        return indexes
