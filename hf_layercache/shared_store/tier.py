"""``SharedTier``: Redis as the second tier of a model's ``exact`` or ``prefix`` banks.

The local bank stays tier one, with its policy and budget. A strategy hands the digests its bank lacks to
:meth:`SharedTier.fill`, which asks Redis for all of them in one pipelined read and puts every value that passes
the checks into the local bank, where the strategy's own lookup then finds it. :meth:`SharedTier.write` queues an
entry the strategy just computed and stored for the background writer. Neither raises: whatever fails inside the
tier (a peer's garbled reply, a value no check foresaw) is a miss or a dropped write, counted in ``shared_errors``.

A Redis key is ``<key_prefix>:v1:<key space>:<strategy>:<bank>:<namespace tag>:<digest>``. The key space hashes
what an entry's meaning depends on beyond its digest (the cache builds it: the model identity of
:mod:`hf_layercache.identity`, the cached layers, the strategy and its own fields), and the namespace tag carries the
tenant and the active adapter set. So two models, two layer selections, two tenants or two adapters never meet, and
new weights start a fresh key space. Nothing here knows a strategy: a value is checked as the bank's entry type
(``validate``), the bank's dtype and finiteness, plus an optional check the strategy passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..entries import StoredEntry, check_finite
from ..integrity import resolve_key
from .client import RedisClient
from .codec import decode, encode
from .settings import DEFAULT_BYTES, parse_settings

if TYPE_CHECKING:
    from ..bank import CacheBank
    from ..config import LayerCacheConfig

Check = Callable[[bytes, dict[str, torch.Tensor]], None]
"""A strategy's extra check of one entry found under a digest, raising ``ValueError``."""


class SharedTier:
    """The shared store of one model's cache (``model.layer_cache.shared``)."""

    def __init__(self, config: LayerCacheConfig, key_space: Callable[[], str], model_dtype: Callable[[], torch.dtype]):
        """``key_space()``: the current key space (recomputed by the cache when the model changes); ``model_dtype()``:
        the dtype entries hold without a ``storage_dtype``."""
        self.settings = parse_settings(config.shared_store, config.shared_store_kwargs)
        queue_bytes = self.settings.queue_bytes
        if queue_bytes is None:  # the queue's tensors outlive the banks' evictions: bounded like the banks
            queue_bytes = min(config.max_memory_bytes or DEFAULT_BYTES, DEFAULT_BYTES)
        self.client = RedisClient(self.settings, queue_bytes)
        self._strategy = config.strategy
        self._key_space = key_space
        self._model_dtype = model_dtype
        self._secret = resolve_key(config.integrity_key)

    # --- keys -----------------------------------------------------------------------------------------------------
    def redis_key(self, bank: str, namespace: int, digest: bytes) -> str:
        space = self._key_space()
        return f"{self.settings.key_prefix}:v1:{space}:{self._strategy}:{bank}:{namespace:016x}:{digest.hex()}"

    # --- the two calls strategies make ----------------------------------------------------------------------------
    def fill(
        self, bank: CacheBank, digests: list[bytes], namespace: int, check: Check | None = None
    ) -> list[tuple[bytes, int, StoredEntry]]:
        """Ask Redis, in one round trip, for the ``digests`` ``bank`` lacks; put each valid value found into the
        bank. Returns ``(digest, entry id, stored entry)`` of each entry put. A value that fails a check is a miss
        and is deleted from Redis; one longer than :meth:`value_limit` is a miss read no further."""
        filled: list[tuple[bytes, int, StoredEntry]] = []
        try:
            wanted = [digest for digest in dict.fromkeys(digests) if bank.find(digest) is None]
            keys = [self.redis_key(bank.name, namespace, digest) for digest in wanted]
            found = self.client.read(keys, self.value_limit(bank))
            if not found:
                return []
            misses, refused = 0, 0
            for digest, key, data in zip(wanted, keys, found, strict=True):
                if data is None:
                    misses += 1
                    continue
                try:
                    values, cost = decode(data, key, self._secret)
                    self._check(bank, digest, values, check)
                except Exception as err:  # whatever is wrong with a value: a miss
                    refused += 1
                    self.client.warn_refused(key, str(err))
                    self.client.submit((key, None, 0))
                    continue
                entry = bank.entry_type.from_tensors(values)
                entry_id = bank.put(entry, digest=digest, cost=cost, namespace=namespace)
                stored = bank.get(entry_id) if entry_id is not None else None
                if stored is not None:
                    filled.append((digest, entry_id, stored))
            self.client.count(shared_hits=len(filled), shared_misses=misses + refused, shared_refused=refused)
        except Exception as err:  # a failure of the tier itself: what was filled so far stays, the rest computes
            self.client.failed(err, "filling", down=False)
        return filled

    def value_limit(self, bank: CacheBank) -> int:
        """The most bytes a value for ``bank`` may have: ``max_value_bytes``, and no more than the bank's byte budget
        (a value is never longer than the bytes its entry counts, which add 512 per tensor and per entry to the data,
        more than the frame and safetensors header take, so a longer one could not be kept: ``put`` refuses it)."""
        limit = self.settings.max_value_bytes
        return min(limit, bank.max_bytes) if bank.max_bytes is not None else limit

    def write(self, bank: CacheBank, entry_id: int | None, digest: bytes, namespace: int, cost: float) -> None:
        """Queue the entry the strategy just stored in ``bank`` to be written to Redis in the background (its stored
        tensors are not changed afterwards; they are serialised in the writer thread)."""
        try:
            entry = bank.get(entry_id) if entry_id is not None else None
            if entry is None:
                return
            values = entry.to_tensors()
            key, secret = self.redis_key(bank.name, namespace, digest), self._secret
            nbytes = sum(t.numel() * t.element_size() for t in values.values())
            self.client.submit((key, lambda: encode(values, key, cost, secret), nbytes))
        except Exception as err:  # not shared, never an error of the request
            self.client.failed(err, "queueing", down=False)

    # --- checks ---------------------------------------------------------------------------------------------------
    def _check(self, bank: CacheBank, digest: bytes, values: dict[str, torch.Tensor], check: Check | None) -> None:
        """``ValueError`` unless the value is an entry this model could have stored: the bank's entry type's fields
        and shapes, the strategy's own check, every float in the dtype the bank stores, and no NaN or infinity."""
        bank.entry_type.validate(values, **bank.expected)
        if check is not None:
            check(digest, values)
        dtype = bank.storage_dtype or self._model_dtype()
        for name, tensor in values.items():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                raise ValueError(f"{name!r} is {tensor.dtype}; this model's entries hold {dtype}")
        check_finite(values)

    # --- reporting and lifetime -----------------------------------------------------------------------------------
    def report(self) -> dict[str, int]:
        return self.client.report()

    def reset_counters(self) -> None:
        self.client.reset()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the entries queued so far are written; ``False`` when ``timeout`` seconds pass first."""
        return self.client.flush(timeout)

    def close(self) -> None:
        """Write what is queued, then stop the writer and close the connections."""
        self.client.close()
