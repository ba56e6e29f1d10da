"""Storing new blocks: a call's, read from its filled cache and spliced hidden states, and (:mod:`.answers`) the
tokens a ``generate()`` call decoded."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from ...bank import CacheBank
from ..base import SharedStore
from .block import PrefixBlock
from .run import PrefixRun
from .siblings import SiblingIndex
from .slots import copy_on_one_thread

_GATHER_BYTES = 32 * 2**20
"""The most bytes of keys and values a store gathers at once (more only when one block is larger)."""


class GatherBuffer:
    """Memory kept for gathering rows' states, reused by every store: gathering into fresh tensors faulted in every
    page each time (2,800 page faults for a 300-token SmolLM2 prompt at about 2 us each on the development VM, as
    much as the copies themselves). At most :data:`_GATHER_BYTES` (or one block), outside the bank's budget; one
    store uses it at a time (``lock``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._memory: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Two tensors of ``shape`` (keys and values), views of the kept memory, grown when it is too small."""
        size = torch.Size(shape).numel() * dtype.itemsize
        stride = -(-size // 64) * 64  # both views aligned for any dtype
        memory = self._memory
        if memory is None or memory.numel() < 2 * stride or memory.device != device:
            memory = self._memory = torch.empty(2 * stride, dtype=torch.uint8, device=device)
        return tuple(memory[i * stride : i * stride + size].view(dtype).view(shape) for i in range(2))


class _Window(NamedTuple):
    """Columns ``[start, end)`` of batch row ``row``, gathered."""

    row: int
    start: int
    end: int
    keys: torch.Tensor
    values: torch.Tensor


class RowStates:
    """The keys and values ``(layer, head, token, dim)`` of a call's rows at the columns of their new blocks,
    gathered into a :class:`GatherBuffer` a window of columns at a time and cut into blocks there. Gathering per
    block cost a copy per layer and block (1,140 small copies for a 300-token prompt's 19 blocks); per window it is
    one per layer. Blocks are asked for tails first, so a window ends at the block asked for. Each layer's slice is
    copied on one thread (:func:`~.slots.copy_on_one_thread`). A block's states are views of the buffer: the bank
    copies them when it puts the block, before the next window overwrites them."""

    def __init__(self, layers: list[Any], starts: dict[int, int], device: torch.device | None, buffer: GatherBuffer):
        self.layers = layers
        self.starts = starts
        """Per batch row, the first column its blocks take: a window reaches no further back."""
        self.device = device
        self.buffer = buffer
        self._window: _Window | None = None
        """The columns gathered last."""

    def block(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of batch row ``row``'s columns ``[start, end)``."""
        window = self._window
        if window is None or window.row != row or not window.start <= start <= end <= window.end:
            window = self._window = self._gather(row, start, end)
        columns = slice(start - window.start, end - window.start)
        return window.keys[:, :, columns], window.values[:, :, columns]

    def _gather(self, row: int, start: int, end: int) -> _Window:
        keys = self.layers[0].keys
        per_token = 2 * len(self.layers) * keys.shape[1] * keys.shape[-1] * keys.dtype.itemsize
        first = max(min(start, self.starts.get(row, start)), end - max(end - start, _GATHER_BYTES // per_token))
        shape = (len(self.layers), keys.shape[1], end - first, keys.shape[-1])
        device = self.device if self.device is not None else keys.device
        gathered = self.buffer.take(shape, keys.dtype, device)
        for target, name in zip(gathered, ("keys", "values"), strict=True):
            for layer_target, layer in zip(target, self.layers, strict=True):
                copy_on_one_thread(layer_target, getattr(layer, name)[row, :, first:end])
        return _Window(row, first, end, *gathered)


class BlockStore:
    """Puts the blocks a call computed into the bank (and the shared tier), and indexes them under their parents."""

    def __init__(self, bank: CacheBank, siblings: SiblingIndex, shared: SharedStore | None, n_layers: int):
        self.bank = bank
        self.siblings = siblings
        self.shared = shared
        self.n_layers = n_layers
        self._buffer = GatherBuffer()

    def store(self, run: PrefixRun, namespace: int, seconds_per_token: float) -> None:
        """Every row's pending blocks, chain tails first: recency-based policies then evict a chain from its tail and
        never drop the shared head while its tails survive. A block another row of the call stores too (the same
        digest) is stored once."""
        if run.cache.get_seq_length() != run.hidden.shape[1]:
            return  # the model did not leave the states we expect: store nothing rather than guess
        rows = [(i, run.rows[r]) for i, r in enumerate(run.group.rows) if run.rows[r].pending]
        starts = {i: row.first + row.pending[0].start for i, row in rows}
        stored: set[bytes] = set()
        pending = [(i, row, block) for i, row in rows for block in row.pending]
        with self.gathering(run.cache.layers, starts) as states:
            for i, row, block in reversed(pending):
                if block.digest in stored or self.bank.find(block.digest) is not None:
                    continue
                stored.add(block.digest)
                column = row.first + block.start
                key, value = states.block(i, column, column + block.size)
                entry = PrefixBlock(
                    key=key,
                    value=value,
                    hidden=run.hidden[i, column : column + block.size],
                    tokens=row.tokens[block.start : block.start + block.size].clone(),
                    parent=block.parent,
                )
                self.put(entry, block.digest, namespace, seconds_per_token * block.size)
        self.sweep()

    @contextmanager
    def gathering(self, layers: list[Any], starts: dict[int, int]) -> Iterator[RowStates]:
        """The states of a cache's rows from ``starts`` (per batch row, the first column its blocks take), for one
        store at a time: its blocks are put before the buffer is lent again."""
        with self._buffer.lock:
            yield RowStates(layers[: self.n_layers], starts, self.bank.device, self._buffer)

    def put(self, entry: PrefixBlock, digest: bytes, namespace: int, cost: float) -> None:
        """One block into the bank, the shared tier (written in the background) and the sibling index."""
        entry_id = self.bank.put(entry, digest=digest, cost=cost, namespace=namespace)
        if self.shared is not None:
            self.shared.write(self.bank, entry_id, digest, namespace, cost)
        if entry_id is not None:
            self.siblings.add(entry.parent, entry_id, entry.tokens)

    def sweep(self) -> None:
        """Drop evicted entries from the sibling index once it has grown (amortised)."""
        self.siblings.sweep_if_large(self.bank.__contains__, len(self.bank))
