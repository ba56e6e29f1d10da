"""Recording and replaying the key/value-cache writes of a layer.

A decoder layer that is skipped must still leave in its KV cache what generation reads later. Rather than
knowing each cache class, we record the ``update(key, value, layer_idx)`` calls the layer makes while it computes,
and replay the same calls when it is skipped: the cache then ends in the state the real computation gave it, for
dynamic, sliding-window and encoder-decoder caches alike.

The cache is found by what it is, not by the name of the argument carrying it: transformers 5.24 renamed
``past_key_values`` to ``cache`` (the old name is deprecated until 5.40), and older releases only know the old name.
:func:`find_cache` takes any :class:`transformers.Cache` under either name (or any other), and
:func:`cache_parameter` tells which name a forward's own signature uses, so calls the library makes itself pass the
cache under that name and trigger no deprecation warning.

Entries that keep recorded writes store them through one codec (:func:`encode_writes` / :func:`decode_writes`), as
tensors named ``<prefix>.<i>.<tag>.<layer_idx>.key`` and ``....value``, so every strategy reads and checks them alike.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

from .hooks import eager, temporarily

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
"""Names transformers has given the KV-cache argument, newest first."""


def find_cache(arguments: dict[str, Any]) -> Any:
    """The KV cache among a call's named arguments (``None`` when it has none): under a known name, or any
    argument holding a :class:`transformers.Cache`."""
    for name in CACHE_ARGUMENTS:
        value = arguments.get(name)
        if value is not None:
            return value
    return next((value for value in arguments.values() if isinstance(value, Cache)), None)


def without_cache(arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments less every name the KV cache may arrive under."""
    cache = find_cache(arguments)
    return {k: v for k, v in arguments.items() if k not in CACHE_ARGUMENTS and (cache is None or v is not cache)}


def cache_parameter(forward: Callable[..., Any]) -> str:
    """The name ``forward``'s signature gives its KV-cache argument (``past_key_values`` when it names none, which
    is what every release in the supported range still accepts)."""
    return _cache_parameter(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=256)
def _cache_parameter(function: Callable[..., Any]) -> str:
    parameters = inspect.signature(function).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), "past_key_values")


@dataclass
class KVWrite:
    """One ``cache.update`` call: which (sub)cache, which layer index, and the key/value states written."""

    tag: str
    layer_idx: int
    key: torch.Tensor
    value: torch.Tensor


def _subcaches(past_key_values) -> dict[str, object]:
    if hasattr(past_key_values, "self_attention_cache") and hasattr(past_key_values, "cross_attention_cache"):
        return {"self": past_key_values.self_attention_cache, "cross": past_key_values.cross_attention_cache}
    return {"self": past_key_values}


def past_length(past_key_values, layer_idx: int | None = None) -> int:
    """Tokens already in the cache (0 at prefill); ``None`` caches count as empty."""
    if past_key_values is None:
        return 0
    try:
        return int(past_key_values.get_seq_length(layer_idx or 0))
    except (AttributeError, IndexError, TypeError):
        return int(past_key_values.get_seq_length())


@contextlib.contextmanager
def record_kv_writes(cache: Any) -> Iterator[list[KVWrite]]:
    """Record every ``update`` the enclosed code makes on ``cache`` (which still receives them)."""
    writes: list[KVWrite] = []
    with contextlib.ExitStack() as patches:
        for tag, sub in (_subcaches(cache) if cache is not None else {}).items():
            original = sub.update

            def update(key_states, value_states, layer_idx, *args, _tag=tag, _original=original, **kwargs):
                writes.append(KVWrite(_tag, int(layer_idx), key_states.detach(), value_states.detach()))
                return _original(key_states, value_states, layer_idx, *args, **kwargs)

            patches.enter_context(temporarily(sub, "update", eager(update)))  # not traced into a compiled layer
        yield writes


def replay_kv_writes(past_key_values, writes: list[KVWrite]) -> None:
    """Apply recorded writes to ``past_key_values`` as the layer itself would have."""
    if past_key_values is None:
        return
    caches = _subcaches(past_key_values)
    for write in writes:
        caches[write.tag].update(write.key, write.value, write.layer_idx)
        if write.tag == "cross" and hasattr(past_key_values, "is_updated"):
            past_key_values.is_updated[write.layer_idx] = True


def place_writes(
    per_row: list[list[KVWrite]], columns: list[slice | torch.Tensor | None] | None, length: int
) -> list[KVWrite]:
    """Join writes of single rows, ``(1, heads, n, dim)``, into batch writes of ``length`` columns.

    A row with ``columns`` stored its real tokens only: its states go to those columns of this batch's layout, and
    its pad columns are zeros (the attention mask hides them, as it hides the pad states an uncached run computes).
    A row with ``None`` (a row keyed with its layout, e.g. a mask with holes) stored its writes whole, already
    ``length`` long, and is copied as it is. One batch may hold both kinds, so each row is placed by its own entry
    of ``columns``, never by a verdict for the whole batch (a right-padded row beside a holed one once made this
    join rows of different lengths). When no row has columns (``columns=None``, or ``None`` for every row) the
    writes are joined as they are: they may cover other positions than the batch's (an encoder-decoder's
    cross-attention covers the encoder's tokens)."""
    if columns is None or all(where is None for where in columns):
        return [
            KVWrite(
                w.tag,
                w.layer_idx,
                torch.cat([row[i].key for row in per_row]),
                torch.cat([row[i].value for row in per_row]),
            )
            for i, w in enumerate(per_row[0])
        ]
    placed = []
    for i, first in enumerate(per_row[0]):
        key = first.key.new_zeros((len(per_row), first.key.shape[1], length, first.key.shape[-1]))
        value = first.value.new_zeros((len(per_row), first.value.shape[1], length, first.value.shape[-1]))
        for row, (writes, where) in enumerate(zip(per_row, columns, strict=True)):
            where = slice(None) if where is None else where
            where = where.to(key.device) if isinstance(where, torch.Tensor) else where
            key[row][:, where] = writes[i].key[0].to(key.device, key.dtype)
            value[row][:, where] = writes[i].value[0].to(value.device, value.dtype)
        placed.append(KVWrite(first.tag, first.layer_idx, key, value))
    return placed


# --- the codec of stored writes -------------------------------------------------------------------------------------
def encode_writes(writes: list[KVWrite], prefix: str = "kv") -> dict[str, torch.Tensor]:
    """Writes (already cut to the rows and positions an entry keeps) as named tensors, in call order."""
    tensors = {}
    for i, w in enumerate(writes):
        name = f"{prefix}.{i}.{w.tag}.{w.layer_idx}"
        tensors[f"{name}.key"], tensors[f"{name}.value"] = w.key, w.value
    return tensors


def decode_writes(values: dict[str, torch.Tensor], prefix: str = "kv") -> list[KVWrite]:
    """The writes :func:`encode_writes` stored under ``prefix``, in call order (other tensors are ignored)."""
    found = {}
    for name in values:
        parts = _write_name(name, prefix)
        if parts is not None and parts[3] == "key":
            i, tag, layer_idx, _ = parts
            found[i] = KVWrite(tag, layer_idx, values[name], values[name[: -len("key")] + "value"])
    return [found[i] for i in sorted(found)]


def check_writes(values: dict[str, torch.Tensor], prefix: str = "kv") -> None:
    """Refuse stored writes read from disk that :func:`decode_writes` could not replay: a key without its value,
    non-floating or differently shaped states, anything but one row, a name of another form under ``prefix``."""
    for name, tensor in values.items():
        if not name.startswith(prefix + "."):
            continue
        parts = _write_name(name, prefix)
        if parts is None:
            raise ValueError(f"{name!r} is not a stored write ('{prefix}.<i>.<tag>.<layer_idx>.key' or '.value').")
        other = name[: -len(parts[3])] + ("value" if parts[3] == "key" else "key")
        partner = values.get(other)
        if partner is None:
            raise ValueError(f"{name!r} has no {other!r} beside it.")
        if not tensor.is_floating_point() or tensor.dim() < 2 or tensor.shape[0] != 1:
            raise ValueError(
                f"{name!r} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; expected one row of floating "
                "key/value states."
            )
        if parts[3] == "key" and tensor.shape[:-1] != partner.shape[:-1]:
            raise ValueError(f"{name!r} and {other!r} cover different heads or positions.")


def _write_name(name: str, prefix: str) -> tuple[int, str, int, str] | None:
    """``(i, tag, layer_idx, "key" | "value")`` of a tensor name under ``prefix``, or ``None``."""
    if not name.startswith(prefix + "."):
        return None
    parts = name[len(prefix) + 1 :].split(".")
    if len(parts) != 4 or not parts[0].isdigit() or not parts[2].isdigit() or parts[3] not in ("key", "value"):
        return None
    return int(parts[0]), parts[1], int(parts[2]), parts[3]
