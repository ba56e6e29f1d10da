"""Row keys: a blake2b digest over every input a row's output depends on, and where the row's real tokens sit.

A model that runs one layer stack over its input (encoders, decoders) keys a row on its *real* tokens: the
attention mask's ones, which must be one contiguous run. Per-token inputs it knows (token ids, token types,
position ids, embeddings, ``cache_position``) enter the digest at those columns only, with the column of the first
real token when no ``position_ids`` say where the tokens are (left padding moves an absolute-position encoder's
positions). So a text hits whatever batch it arrives in and however that batch is padded; its stored states are
placed into the new layout (:class:`RowKey.columns`). Anything else (an encoder-decoder's two inputs, a
non-contiguous or 4-D mask, tensors it does not know that run along the sequence) keys the whole row, mask and pads
included: such a row hits only in the layout it was computed in. Every field is length-prefixed, the namespace
first, so no two different inputs share a byte stream.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...kv import CACHE_ARGUMENTS
from ...layers import flat_tensors

# Model-level arguments that never carry the batch in dimension 0, even when their length happens to equal it.
_NOT_PER_ROW = frozenset({"cache_position", *CACHE_ARGUMENTS})
_BATCH_SOURCES = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "hidden_states")
_PER_TOKEN = frozenset({"input_ids", "inputs_embeds", "token_type_ids", "position_ids", "cache_position"})
"""Arguments whose sequence dimension runs along the tokens, cut to a row's real tokens."""


@dataclass(frozen=True)
class RowKey:
    """One row of a request: its digest, and the columns its real tokens take in this batch's layout."""

    digest: bytes
    columns: slice
    """Real tokens, ``[first, first + n)``; the whole row when the key covers the layout too."""
    length: int
    """The batch's padded length."""
    free: bool = True
    """Keyed on the real tokens alone; else on the whole row, layout included."""

    def for_stack(self, length: int) -> RowKey:
        """The key as a stack of ``length`` positions sees it: a layout-bound key covers a whole row of any stack
        (an encoder-decoder's decoder runs over other positions than the input's)."""
        return self if self.free else RowKey(self.digest, slice(0, length), length, free=False)

    @property
    def layout(self) -> tuple[int, int, int]:
        """``(padded length, first real column, real tokens)``: rows of equal layout are served bit for bit."""
        return self.length, self.columns.start, self.columns.stop - self.columns.start


def _host_array(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a numpy array on the host (half floats as int16: numpy has no bfloat16), read once per
    request; rows and columns are then cut in numpy, which costs a microsecond where a tensor op costs several."""
    if t.requires_grad or not t.is_cpu:
        t = t.detach().cpu()
    dtype = t.dtype  # dtypes are singletons
    if dtype is torch.bfloat16 or dtype is torch.float16:
        t = t.view(torch.int16)
    elif dtype is torch.bool:
        t = t.to(torch.uint8)
    return t.numpy()


def _batch_size(arguments: dict[str, Any]) -> int | None:
    for name in _BATCH_SOURCES:
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _sequence_length(arguments: dict[str, Any], batch: int) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
            return int(value.shape[1])
    return None


def _real_columns(
    mask: torch.Tensor | None, batch: int, length: int, host: np.ndarray | None = None
) -> list[slice | None]:
    """Per row, its real tokens as one run of columns, or ``None`` when the mask does not say so plainly (``host``:
    the mask's :func:`_host_array`, when the caller has it already)."""
    if mask is None:
        return [slice(0, length)] * batch
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (batch, length):
        return [None] * batch
    if host is None:
        host = _host_array(mask)
    if length and (host == 1).all():  # no padding (every row's real tokens are all of it): one test, not one per row
        return [slice(0, length)] * batch
    rows = []
    for row in host:
        real = np.flatnonzero(row)
        n = real.size
        plain = n > 0 and int(real[-1] - real[0]) + 1 == n and bool((row[real] == 1).all())
        rows.append(slice(int(real[0]), int(real[0]) + n) if plain else None)
    return rows


class _Digest:
    """blake2b over length-prefixed fields."""

    def __init__(self, namespace: str):
        self._h = hashlib.blake2b(digest_size=32)
        self.field(b"namespace", namespace.encode())

    def field(self, label: bytes, data: bytes | memoryview) -> None:
        for part in (label, data):
            self._h.update(len(part).to_bytes(8, "little"))
            self._h.update(part)

    def array(self, label: str, dtype: torch.dtype, a: np.ndarray) -> None:
        self.field(f"{label}:{dtype}:{a.shape}".encode(), memoryview(np.ascontiguousarray(a)).cast("B"))

    def digest(self) -> bytes:
        return self._h.digest()


def row_keys(arguments: dict[str, Any], namespace: str, layout_free: bool) -> list[RowKey] | None:
    """One key per row (see the module docstring); ``layout_free=False`` keys every row with its layout.

    Deterministic across processes (no Python ``hash``). ``None`` when the batch size cannot be told.
    """
    return _keys_of(arguments, _host_tensors(arguments), namespace, layout_free)


_Tensors = list[tuple[str, int, torch.dtype, np.ndarray]]
_UNKNOWN = object()


def _argument_tensors(arguments: dict[str, Any]) -> list[tuple[str, int, torch.Tensor]]:
    """Every tensor among the arguments (inside tuples, lists and dicts too), by name and position: the tensors
    :func:`_host_tensors` converts, in its order."""
    found = []
    for name in sorted(arguments):
        value = arguments[name]
        if isinstance(value, torch.Tensor):
            found.append((name, 0, value))
        elif value is not None:
            found.extend((name, i, t) for i, t in enumerate(flat_tensors(value)))
    return found


def _raw_bytes(t: torch.Tensor) -> Any:
    """The bytes :func:`_host_array` gives (in memory order), as a buffer: for a contiguous CPU tensor a ctypes view
    of its memory, read without building a numpy array (a few microseconds of a cold cache hit); else through it."""
    if t.is_cpu and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
        return (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    return np.ascontiguousarray(_host_array(t))


def _host_tensors(arguments: dict[str, Any]) -> _Tensors:
    """Every tensor among the arguments (inside tuples, lists and dicts too), by name and position, on the host."""
    found: _Tensors = []
    for name in sorted(arguments):
        value = arguments[name]
        if isinstance(value, torch.Tensor):  # the common case, without the walk through containers
            found.append((name, 0, value.dtype, _host_array(value)))
        elif value is not None:
            found.extend((name, i, t.dtype, _host_array(t)) for i, t in enumerate(flat_tensors(value)))
    return found


def _keys_of(arguments: dict[str, Any], tensors: _Tensors, namespace: str, layout_free: bool) -> list[RowKey] | None:
    batch = _batch_size(arguments)
    if batch is None:
        return None
    length = _sequence_length(arguments, batch)
    columns: list[slice | None] = [None] * batch
    if layout_free and length is not None:
        host = next((array for name, i, _, array in tensors if name == "attention_mask" and i == 0), None)
        columns = _real_columns(arguments.get("attention_mask"), batch, length, host)
    return [_row_key(tensors, namespace, batch, length, row, columns[row]) for row in range(batch)]


class RowKeyMemo:
    """The row keys of recent requests, by one digest of the whole request: a repeated request is keyed with one hash
    over its tensors' bytes instead of one digest per row and field.

    :func:`row_keys` is a function of the arguments' tensors (names, positions, dtypes, shapes, bytes), the namespace
    and ``layout_free`` only, and the request digest covers all of them, so a remembered answer is the answer. Kept
    for the ``size`` most recent requests (a few hundred bytes per row, outside the banks' budget).
    """

    def __init__(self, layout_free: bool, size: int = 256):
        self.layout_free = layout_free
        self.size = size
        self._keys: OrderedDict[tuple, list[RowKey] | None] = OrderedDict()
        self._lock = threading.Lock()

    def row_keys(self, arguments: dict[str, Any], namespace: str) -> list[RowKey] | None:
        digest = hashlib.blake2b(digest_size=32)
        described = []
        for name, i, t in _argument_tensors(arguments):
            digest.update(_raw_bytes(t))
            described.append((name, i, t.dtype, tuple(t.shape)))
        # the description fixes every tensor's byte length, so the bytes can follow one another unprefixed; kept as
        # a tuple beside the digest (the memo's key), which is cheaper than hashing its text
        request = (namespace, tuple(described), digest.digest())
        with self._lock:
            keys = self._keys.get(request, _UNKNOWN)
            if keys is not _UNKNOWN:
                self._keys.move_to_end(request)
                return keys
        keys = _keys_of(arguments, _host_tensors(arguments), namespace, self.layout_free)
        with self._lock:
            self._keys[request] = keys
            if len(self._keys) > self.size:
                self._keys.popitem(last=False)
        return keys


def _row_key(
    tensors: list[tuple[str, int, torch.dtype, np.ndarray]],
    namespace: str,
    batch: int,
    length: int | None,
    row: int,
    real: slice | None,
) -> RowKey:
    h = _Digest(namespace)
    h.field(b"layout", b"free" if real is not None else b"bound")
    if real is not None and not any(name == "position_ids" for name, *_ in tensors):
        h.field(b"first", real.start.to_bytes(8, "little"))
    for name, i, dtype, t in tensors:
        per_row = name not in _NOT_PER_ROW and t.ndim > 0 and t.shape[0] == batch
        piece = t[row] if per_row else t
        if real is not None:
            if name == "attention_mask":
                continue  # its ones are the real tokens, which the other fields cover
            piece = _real_part(name, piece, per_row, length, real)
            if piece is None:  # a tensor along the sequence this module does not know: the layout stays in the key
                return _row_key(tensors, namespace, batch, length, row, None)
        h.array(f"{name}.{i}", dtype, piece)
    whole = slice(0, length if length is not None else 0)
    return RowKey(h.digest(), real if real is not None else whole, whole.stop, free=real is not None)


def _real_part(name: str, piece: torch.Tensor, per_row: bool, length: int | None, real: slice) -> torch.Tensor | None:
    """``piece`` at the row's real tokens when it runs along the sequence; unchanged when it does not; ``None``
    when it may run along the sequence but is not an argument known to."""
    if per_row:
        along = piece.ndim >= 1 and piece.shape[0] == length
        return piece[real] if along and name in _PER_TOKEN else (None if along else piece)
    if piece.ndim == 1 and piece.shape[0] == length:  # cache_position
        return piece[real] if name in _PER_TOKEN else None
    if piece.ndim >= 2 and piece.shape[0] == 1 and piece.shape[1] == length:  # position_ids shared by the rows
        return piece[:, real] if name in _PER_TOKEN else None
    return piece
