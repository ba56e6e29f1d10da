"""A bank's saved state taken apart and checked: the one parser of what ``CacheBank.state_dict`` writes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DIGEST_BYTES = 32
MAX_ID = 2**62
"""Entry ids a saved bank may hold: far more than any bank inserts, far enough from int64's end that new ids fit."""


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
