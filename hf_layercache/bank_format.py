"""The bank format, in one place: what an entry costs in memory, and the named tensors a bank's state is.

:func:`entry_bytes` is the cost model every budget decision uses. :func:`write_state` writes a bank's entries, policy
and backend as named tensors (nothing else, so a warm cache is safetensors only); :class:`BankState` is the one
parser of that layout (used to check a warm cache and to load it), and :func:`trim_state` cuts a saved state to a
budget before the dropped entries are read.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .policies.base import Policy

DIGEST_BYTES = 32
MAX_ID = 2**62
"""Entry ids a saved bank may hold: far more than any bank inserts, far enough from int64's end that new ids fit."""
ENTRY_OVERHEAD_BYTES = 512
"""Bytes counted per entry on top of its tensors' data: the entry object, digest, dict slots, policy bookkeeping."""
TENSOR_OVERHEAD_BYTES = 512
"""Bytes counted per stored tensor on top of its data: the tensor and storage objects and allocator rounding.
Both figures were measured as resident memory per entry (about 1.2 KB for an entry of one tiny tensor)."""
_HEADER = ("ids", "digests", "has_digest", "namespaces")


def entry_bytes(values: Mapping[str, torch.Tensor], key_dim: int = 0) -> int:
    """What an entry costs in memory: its tensors' data, the measured per-object overheads, and its raw float32 key
    (index structures beyond the raw keys are the backend's own count)."""
    data = sum(t.numel() * t.element_size() for t in values.values())
    return data + TENSOR_OVERHEAD_BYTES * len(values) + ENTRY_OVERHEAD_BYTES + 4 * key_dim


def write_state(
    entries: Iterable[tuple[int, Mapping[str, torch.Tensor], bytes | None, int]],
    policy: Mapping[str, torch.Tensor],
    backend: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """A bank's state as named tensors: ``ids``, ``digests``, ``has_digest``, ``namespaces``, each entry's fields as
    ``entry.<id>.<field>``, then ``policy.*`` and ``backend.*``. ``entries`` are ``(id, values, digest, namespace)``
    in id order."""
    entries = list(entries)
    ids = [entry_id for entry_id, _, _, _ in entries]
    state: dict[str, torch.Tensor] = {"ids": torch.tensor(ids, dtype=torch.long)}
    digests = torch.zeros(len(ids), DIGEST_BYTES, dtype=torch.uint8)
    has_digest = torch.zeros(len(ids), dtype=torch.bool)
    for row, (entry_id, values, digest, _) in enumerate(entries):
        if digest is not None:
            digests[row] = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
            has_digest[row] = True
        for name, tensor in values.items():
            state[f"entry.{entry_id}.{name}"] = tensor
    state["digests"], state["has_digest"] = digests, has_digest
    state["namespaces"] = torch.tensor([namespace for _, _, _, namespace in entries], dtype=torch.long)
    state.update({f"policy.{k}": v for k, v in policy.items()})
    if backend is not None:
        state.update({f"backend.{k}": v for k, v in backend.items()})
    return state


def merge_index_states(states: Iterable[Mapping[str, torch.Tensor]], key_dim: int) -> dict[str, torch.Tensor]:
    """The tenants' index states as the one ``backend.ids`` / ``backend.keys`` section a warm cache holds (the layout
    of every built-in backend's state, which also held every tenant's keys before each tenant had an index)."""
    ids, keys = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, key_dim)]
    for state in states:
        if "ids" not in state or "keys" not in state:
            raise ValueError(
                f"a backend state must hold 'ids' and 'keys' (the bank saves each tenant's keys), got {sorted(state)}."
            )
        ids.append(state["ids"].cpu().long())
        keys.append(state["keys"].cpu().float())
    return {"ids": torch.cat(ids), "keys": torch.cat(keys)}


def split_index_state(state: Mapping[str, torch.Tensor], namespaces: Mapping[int, int]) -> dict[int, dict]:
    """A saved ``backend`` section cut into each tenant's index state by the ``namespaces`` of the entries its ids
    name (keys of no listed entry are dropped). An empty section (a bank without keys) gives no index."""
    if not state:
        return {}
    ids, keys = state.get("ids"), state.get("keys")
    if ids is None or keys is None or ids.dim() != 1 or keys.dim() != 2 or ids.shape[0] != keys.shape[0]:
        raise ValueError("the saved index must be 'backend.ids' (n,) with 'backend.keys' (n, dim).")
    rows: dict[int, list[int]] = {}
    for row, entry_id in enumerate(ids.tolist()):
        if entry_id in namespaces:
            rows.setdefault(namespaces[entry_id], []).append(row)
    return {ns: {"ids": ids[torch.tensor(r)], "keys": keys[torch.tensor(r)]} for ns, r in rows.items()}


@dataclass
class BankState:
    """A bank's :meth:`~CacheBank.state_dict` taken apart: the one parser of bank state, used to check a warm cache
    (the strategy then checks each entry's fields) and to load it."""

    entries: dict[int, dict[str, torch.Tensor]]
    """Per entry id, in the saved order, its tensors by field name."""
    digests: dict[int, bytes | None]
    namespaces: dict[int, int]
    policy: dict[str, torch.Tensor]
    backend: dict[str, torch.Tensor]

    @classmethod
    def parse(cls, state: dict[str, torch.Tensor]) -> BankState:
        ids = state.get("ids")
        if ids is None or ids.dtype != torch.long or ids.dim() != 1:
            raise ValueError("'ids' must be a 1-D int64 tensor.")
        n = ids.numel()
        if n and (int(ids.min()) < 0 or int(ids.max()) >= MAX_ID or ids.unique().numel() != n):
            raise ValueError(f"'ids' must be distinct integers in [0, {MAX_ID}).")
        digests, has_digest, namespaces = state.get("digests"), state.get("has_digest"), state.get("namespaces")
        if digests is None or digests.dtype != torch.uint8 or tuple(digests.shape) != (n, DIGEST_BYTES):
            raise ValueError(f"'digests' must be a uint8 tensor of shape ({n}, {DIGEST_BYTES}).")
        if has_digest is None or has_digest.dtype != torch.bool or tuple(has_digest.shape) != (n,):
            raise ValueError(f"'has_digest' must be a bool tensor of shape ({n},).")
        if namespaces is None or namespaces.dtype != torch.long or tuple(namespaces.shape) != (n,):
            raise ValueError(f"'namespaces' must be an int64 tensor of shape ({n},).")
        order = ids.tolist()
        parsed = cls(
            entries={i: {} for i in order},
            digests={i: bytes(digests[row].tolist()) if bool(has_digest[row]) else None for row, i in enumerate(order)},
            namespaces=dict(zip(order, namespaces.tolist(), strict=True)),
            policy={},
            backend={},
        )
        for name, tensor in state.items():
            if name in ("ids", "digests", "has_digest", "namespaces"):
                continue
            section, _, rest = name.partition(".")
            if section in ("policy", "backend") and rest:
                getattr(parsed, section)[rest] = tensor
                continue
            entry_id, _, field_name = rest.partition(".")
            if section != "entry" or not entry_id.isdigit() or int(entry_id) not in parsed.entries or not field_name:
                raise ValueError(f"unexpected tensor {name!r} (not an entry of a listed id).")
            parsed.entries[int(entry_id)][field_name] = tensor
        return parsed


def trim_state(
    state: Mapping[str, torch.Tensor], policy: Policy, max_entries: int | None, max_bytes: int | None, key_dim: int
) -> Mapping[str, torch.Tensor]:
    """``state`` cut down, by ``policy``'s eviction order, to the entries a bank of this budget keeps, reading none
    of the dropped entries' tensors.

    A warm cache may hold far more than this bank may keep (saved under a larger budget, or crafted: 200,000 tiny
    entries). Loading it whole and evicting afterwards would allocate every entry first; here the sizes come from
    the shard headers (``state.nbytes(name)`` when ``state`` is the lazy mapping of
    :func:`~hf_layercache.shards.read_tensors`) and only the survivors are read. The bank still evicts after
    loading, by the sizes it really stores, so a trim that keeps too much never breaks the budget.
    """
    ids = state.get("ids")
    if ids is None or ids.dtype != torch.long or ids.dim() != 1:
        return state  # BankState.parse says what is wrong
    n = ids.numel()
    if n == 0 or ((max_entries is None or n <= max_entries) and max_bytes is None):
        return state
    probe = copy.deepcopy(policy)
    probe.load_state_dict({name[7:]: state[name] for name in state if name.startswith("policy.")})
    order = list(probe.eviction_order())
    if sorted(order) != sorted(ids.tolist()):
        raise ValueError(f"the policy state tracks {len(order)} entries, not the bank's {n}.")
    sizes = _entry_sizes(state, key_dim)
    keep: set[int] = set()
    total = 0
    for entry_id in reversed(order):  # the last to be evicted are kept
        size = sizes.get(entry_id, 0)
        full = max_entries is not None and len(keep) >= max_entries
        if full or (max_bytes is not None and total + size > max_bytes):
            break
        keep.add(entry_id)
        total += size
    if len(keep) == n:
        return state
    for entry_id in order:
        if entry_id not in keep:
            probe.on_remove(entry_id)
    return _select(state, ids, keep, probe.state_dict())


def _entry_sizes(state: Mapping[str, torch.Tensor], key_dim: int) -> dict[int, int]:
    """Each entry's bytes as the bank will count them (:func:`entry_bytes`), from tensor sizes alone (no data read)."""
    nbytes = getattr(state, "nbytes", None) or (lambda name: state[name].numel() * state[name].element_size())
    sizes: dict[int, int] = {}
    for name in state:
        section, _, rest = name.partition(".")
        entry_id = rest.partition(".")[0]
        if section == "entry" and entry_id.isdigit():
            key = int(entry_id)
            sizes[key] = sizes.get(key, ENTRY_OVERHEAD_BYTES + 4 * key_dim) + nbytes(name) + TENSOR_OVERHEAD_BYTES
    return sizes


def _select(
    state: Mapping[str, torch.Tensor], ids: torch.Tensor, keep: set[int], policy: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The rows and tensors of ``state`` that belong to the ``keep`` entries, with ``policy`` as the policy state."""
    rows = torch.tensor([row for row, entry_id in enumerate(ids.tolist()) if entry_id in keep], dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for name in _HEADER:
        tensor = state.get(name)
        if tensor is not None:
            out[name] = tensor[rows] if tensor.dim() and tensor.shape[0] == ids.numel() else tensor
    out.update({f"policy.{name}": tensor for name, tensor in policy.items()})
    backend_ids, backend_keys = state.get("backend.ids"), state.get("backend.keys")
    if backend_ids is not None and backend_keys is not None and backend_ids.shape[:1] == backend_keys.shape[:1]:
        live = torch.tensor([int(i) in keep for i in backend_ids.tolist()], dtype=torch.bool)
        out["backend.ids"], out["backend.keys"] = backend_ids[live], backend_keys[live]
    for name in state:
        section, _, rest = name.partition(".")
        entry_id = rest.partition(".")[0]
        if section == "backend" and name not in out:
            out[name] = state[name]
        elif section not in (*_HEADER, "policy", "backend") and not (
            section == "entry" and entry_id.isdigit() and int(entry_id) not in keep
        ):
            out[name] = state[name]  # survivors' tensors, and anything unexpected for BankState.parse to refuse
    return out
