"""One cache store: entries of tensors, found by exact digest or by key vector, bounded by a policy and a budget.

An entry is a small dict of tensors (a layer output, recorded key/value states, ...; each strategy's typed entry
says which, see :mod:`hf_layercache.entries`) and the ``namespace`` tag of the tenant it belongs to:
:meth:`CacheBank.get` serves it to that tenant only. It is found either by an exact ``digest`` (bytes, for lossless
strategies) or by similarity of its key vector through a :class:`~hf_layercache.backends.base.Backend`. What a
lookup decided reaches the policy as one :class:`Lookup`. The bank evicts through its
:class:`~hf_layercache.policies.base.Policy` *before* an insert would break ``max_entries`` or ``max_bytes``, so
the budget is never exceeded, not even transiently.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .backends.base import Backend
from .bank_state import DIGEST_BYTES, BankState, trim_state
from .policies.base import Policy

ENTRY_OVERHEAD_BYTES = 512
"""Bytes counted per entry on top of its tensors' data: the entry object, digest, dict slots, policy bookkeeping."""
TENSOR_OVERHEAD_BYTES = 512
"""Bytes counted per stored tensor on top of its data: the tensor and storage objects and allocator rounding.
Both figures were measured as resident memory per entry (about 1.2 KB for an entry of one tiny tensor)."""


@dataclass
class Entry:
    values: dict[str, torch.Tensor]
    nbytes: int
    digest: bytes | None = None
    namespace: int = 0
    """The :func:`~hf_layercache.request.namespace_tag` of the tenant that stored it."""


@dataclass
class Lookup:
    """What a strategy decided about the rows of one call: the entries that serve them, with their similarity, and
    how many lookups found nothing they could use. Recorded once, through
    :meth:`~hf_layercache.controller.LayerCacheController.record_lookup`, it feeds both the bank's policy and the
    layers' stats, so the two never disagree on what a hit is."""

    served: list[tuple[int, float]] = field(default_factory=list)
    missed: int = 0


def entry_bytes(values: dict[str, torch.Tensor]) -> int:
    """What an entry costs in memory: its tensors' data plus the measured per-object overheads."""
    data = sum(t.numel() * t.element_size() for t in values.values())
    return data + TENSOR_OVERHEAD_BYTES * len(values) + ENTRY_OVERHEAD_BYTES


_outside_inference_mode = torch.inference_mode(False)
"""Stores run outside inference mode whatever the caller's: entries and index tensors outlive the request, and a later
call outside ``torch.inference_mode()`` (a verdict recorded in an entry, ``clear()``) updates them in place, which
PyTorch refuses on inference tensors. Stored tensors that are inference tensors are copied."""


class CacheBank:
    """Entries of one layer (or one layer stack), with their lookup structures and eviction bookkeeping.

    Thread-safe: every public method holds the bank's lock, so one model can serve many threads.
    """

    def __init__(
        self,
        name: str,
        policy: Policy,
        backend: Backend | None = None,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        device: torch.device | str | None = None,
        storage_dtype: torch.dtype | None = None,
    ):
        self.name = name
        self.policy = policy
        self.backend = backend
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.device = torch.device(device) if device is not None else None
        self.storage_dtype = storage_dtype
        self._entries: dict[int, Entry] = {}
        self._by_digest: dict[bytes, int] = {}
        self._tenants: dict[int, int] = {}
        """Entries per namespace tag."""
        self._next_id = 0
        self._value_bytes = 0
        self._lock = threading.RLock()

    # --- lookup ---------------------------------------------------------------------------------------------------
    def find(self, digest: bytes) -> int | None:
        with self._lock:
            return self._by_digest.get(digest)

    def search(self, keys: torch.Tensor, k: int = 1, namespace: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most similar entries per key, best first (id -1 where there are fewer); with ``namespace``,
        among that tenant's entries only. The backend searches all tenants' keys, so the search widens (4x at a
        time, up to the whole bank) until every key has ``k`` of its tenant's: other tenants' entries never crowd a
        tenant's own nearest entry out."""
        if self.backend is None:
            raise RuntimeError(f"Bank {self.name!r} has no similarity backend.")
        with self._lock:
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
        entry = self._entries.get(entry_id)
        return entry.namespace if entry is not None else None

    def get(self, entry_id: int, namespace: int | None = None) -> dict[str, torch.Tensor] | None:
        """The entry's tensors; ``None`` when it is gone or (with ``namespace``) belongs to another tenant."""
        with self._lock:
            entry = self._entries.get(entry_id)
            if entry is None or (namespace is not None and entry.namespace != namespace):
                return None
            return entry.values

    def update(self, entry_id: int, change: Callable[[dict[str, torch.Tensor]], None]) -> bool:
        """Apply ``change`` to a stored entry's tensors under the bank's lock (a verdict or prediction recorded in
        the entry); ``False`` when the entry is gone."""
        with self._lock:
            entry = self._entries.get(entry_id)
            if entry is None:
                return False
            change(entry.values)
            return True

    def items(self) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """Every entry's id and values, in insertion order (a snapshot of the list; the dicts are the stored ones)."""
        with self._lock:
            return [(entry_id, entry.values) for entry_id, entry in self._entries.items()]

    def record(self, lookup: Lookup) -> None:
        """Tell the policy what a lookup decided (entries evicted meanwhile are skipped)."""
        with self._lock:
            for entry_id, similarity in lookup.served:
                if entry_id in self._entries:
                    self.policy.on_hit(entry_id, similarity)
            for _ in range(lookup.missed):
                self.policy.on_miss()

    def record_error(self, entry_id: int, error: float) -> None:
        with self._lock:
            if entry_id in self._entries:
                self.policy.on_error(entry_id, error)

    # --- insert / remove ------------------------------------------------------------------------------------------
    @_outside_inference_mode
    def put(
        self,
        values: dict[str, torch.Tensor],
        digest: bytes | None = None,
        key: torch.Tensor | None = None,
        cost: float = 0.0,
        namespace: int = 0,
    ) -> int | None:
        """Store an entry of tenant ``namespace`` and return its id, or ``None`` when it alone is larger than the
        byte budget."""
        values = {name: self._stored(t) for name, t in values.items()}
        nbytes = entry_bytes(values) + self._key_bytes(key)
        with self._lock:
            if digest is not None and digest in self._by_digest:
                self._remove([self._by_digest[digest]])
            if self.max_bytes is not None and nbytes > self.max_bytes:
                return None
            self._make_room(nbytes)
            entry_id = self._next_id
            self._next_id += 1
            self._entries[entry_id] = Entry(values, nbytes, digest, namespace)
            self._count_tenant(namespace, 1)
            self._value_bytes += nbytes
            if digest is not None:
                self._by_digest[digest] = entry_id
            self.policy.on_insert(entry_id, nbytes, cost)
            if key is not None and self.backend is not None:
                self.backend.add(torch.tensor([entry_id]), key.reshape(1, -1))
                self._fit()
            return entry_id if entry_id in self._entries else None

    def remove(self, entry_id: int) -> None:
        with self._lock:
            self._remove([entry_id])

    def clear(self) -> None:
        with self._lock:
            self._remove(list(self._entries))

    def _remove(self, entry_ids: list[int]) -> None:
        """Drop entries (unknown ids are ignored); the backend hears of them in one call, so clearing or evicting
        many costs one index update (or rebuild), not one per entry."""
        removed = [i for i in dict.fromkeys(entry_ids) if i in self._entries]
        for entry_id in removed:
            entry = self._entries.pop(entry_id)
            self._count_tenant(entry.namespace, -1)
            self._value_bytes -= entry.nbytes
            if entry.digest is not None:
                self._by_digest.pop(entry.digest, None)
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

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.storage_dtype is not None and t.is_floating_point():
            t = t.to(self.storage_dtype)
        if self.device is not None:
            t = t.to(self.device)
        if (
            t.is_inference()  # see _outside_inference_mode
            or not t.is_contiguous()
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()  # a row view keeps its batch alive
        ):
            t = t.clone(memory_format=torch.contiguous_format)
        return t

    def _key_bytes(self, key: torch.Tensor | None) -> int:
        # The raw float32 key is charged to its entry; index structures beyond it (graphs, trees) are added in
        # ``nbytes`` from the backend's own count.
        return 0 if key is None else key.numel() * 4

    # --- size -----------------------------------------------------------------------------------------------------
    def namespace_counts(self) -> dict[int, int]:
        """Entries per tenant tag."""
        with self._lock:
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
        """Bytes held: stored tensors, per-entry bookkeeping, and the backend's index beyond the raw keys."""
        index_bytes = self.backend.nbytes if self.backend is not None else 0
        return self._value_bytes + max(0, index_bytes - 4 * self._key_dim() * len(self._entries))

    def _key_dim(self) -> int:
        return self.backend.dim if self.backend is not None else 0

    # --- persistence ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """All entries, digests, namespaces, policy and backend state as named tensors, nothing else (safe to load
        from disk). Entry tensors are named ``entry.<id>.<field>``."""
        with self._lock:
            ids = sorted(self._entries)
            state: dict[str, torch.Tensor] = {"ids": torch.tensor(ids, dtype=torch.long)}
            digests = torch.zeros(len(ids), DIGEST_BYTES, dtype=torch.uint8)
            has_digest = torch.zeros(len(ids), dtype=torch.bool)
            for row, entry_id in enumerate(ids):
                entry = self._entries[entry_id]
                if entry.digest is not None:
                    digests[row] = torch.frombuffer(bytearray(entry.digest), dtype=torch.uint8)
                    has_digest[row] = True
                for name, tensor in entry.values.items():
                    state[f"entry.{entry_id}.{name}"] = tensor
            state["digests"], state["has_digest"] = digests, has_digest
            state["namespaces"] = torch.tensor([self._entries[i].namespace for i in ids], dtype=torch.long)
            state.update({f"policy.{k}": v for k, v in self.policy.state_dict().items()})
            if self.backend is not None:
                state.update({f"backend.{k}": v for k, v in self.backend.state_dict().items()})
            return state

    @staticmethod
    def check_state(state: dict[str, torch.Tensor]) -> BankState:
        """The parts of ``state``; ``ValueError`` unless it has the structure :meth:`state_dict` writes."""
        return BankState.parse(state)

    def check_policy(self, parsed: BankState) -> None:
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
        :func:`~hf_layercache.bank_state.trim_state`)."""
        return trim_state(state, self.policy, self.max_entries, self.max_bytes, self._key_dim())

    @_outside_inference_mode
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the content with ``state``; the entries land on this bank's device."""
        parsed = BankState.parse(state)
        with self._lock:
            self.clear()
            for entry_id, values in parsed.entries.items():
                entry_values = {k: self._stored(v) for k, v in values.items()}
                nbytes = entry_bytes(entry_values) + 4 * self._key_dim()
                digest = parsed.digests[entry_id]
                self._entries[entry_id] = Entry(entry_values, nbytes, digest, parsed.namespaces[entry_id])
                self._count_tenant(parsed.namespaces[entry_id], 1)
                self._value_bytes += nbytes
                if digest is not None:
                    self._by_digest[digest] = entry_id
            self._next_id = max(parsed.entries, default=-1) + 1
            self.policy.load_state_dict(parsed.policy)
            if self.backend is not None:
                self.backend.load_state_dict(parsed.backend)
            self._make_room(0, incoming=0)  # a cache saved under a larger budget is cut to this one, by the policy
