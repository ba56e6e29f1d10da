"""Row digests: the key of a row, a blake2b over every tensor its output depends on, the namespace included."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ...kv import CACHE_ARGUMENTS

# Model-level arguments that never carry the batch in dimension 0, even when their length happens to equal it.
_NOT_PER_ROW = frozenset({"cache_position", *CACHE_ARGUMENTS})
_BATCH_SOURCES = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "hidden_states")


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_tensors(v)]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def _host_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _batch_size(arguments: dict[str, Any]) -> int | None:
    for name in _BATCH_SOURCES:
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def row_digests(arguments: dict[str, Any], namespace: str) -> list[bytes] | None:
    """One blake2b digest per row over every tensor argument (its row slice, or all of it when shared).

    Deterministic across processes (no Python ``hash``). ``None`` when the batch size cannot be told.
    """
    batch = _batch_size(arguments)
    if batch is None:
        return None
    parts: list[tuple[bytes, torch.Tensor, bool]] = []
    for name in sorted(arguments):
        for i, t in enumerate(_flat_tensors(arguments[name])):
            per_row = name not in _NOT_PER_ROW and t.dim() > 0 and t.shape[0] == batch
            parts.append((f"{name}.{i}:{t.dtype}".encode(), t.detach().cpu() if per_row else t, per_row))
    digests = []
    for row in range(batch):
        h = hashlib.blake2b(namespace.encode(), digest_size=32)
        for label, t, per_row in parts:
            piece = t[row] if per_row else t
            h.update(label + str(tuple(piece.shape)).encode())
            h.update(_host_bytes(piece))
        digests.append(h.digest())
    return digests
