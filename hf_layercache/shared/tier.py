"""``SharedTier``: Redis as the second tier of a model's ``exact`` or ``prefix`` banks.

The local bank stays tier one, with its policy and budget. A strategy hands the digests its bank lacks to
:meth:`SharedTier.fill`, which asks Redis for all of them in one ``MGET`` and puts every value that passes the checks
into the local bank, where the strategy's own lookup then finds it. :meth:`SharedTier.write` queues an entry the
strategy just computed and stored for the background writer.

A Redis key is ``<key_prefix>:v1:<model>:<strategy>:<bank>:<namespace tag>:<digest>``. ``<model>`` hashes what an
entry's meaning depends on beyond its digest: the model identity warm caches record (:mod:`hf_layercache.identity`:
class, dtype, every byte of the weights, the forward config, ``storage_dtype``), the cached layers, the strategy and
its fields (``block_size``). The active adapter set is part of the namespace tag (the request's key space).
So two models, two layer selections or two tenants never meet, and new weights start a fresh key space.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..integrity import resolve_key
from ..strategies.base import _check_finite
from .client import RedisClient
from .codec import decode, encode
from .settings import parse_settings

if TYPE_CHECKING:
    from ..bank import CacheBank
    from ..controller import LayerCacheController

Check = Callable[[bytes, dict[str, torch.Tensor]], None]
"""A strategy's check of one entry found under a digest (its typed entry's ``validate``), raising ``ValueError``."""


class SharedTier:
    """The shared store of one model's cache (``model.layer_cache.shared``)."""

    def __init__(self, controller: LayerCacheController):
        config = controller.config
        self.settings = parse_settings(config.shared_store, config.shared_store_kwargs)
        self.client = RedisClient(self.settings)
        self._controller = controller
        self._secret = resolve_key(config.integrity_key)
        self._model: tuple[dict, str] | None = None

    # --- keys -----------------------------------------------------------------------------------------------------
    def model_key(self) -> str:
        """The hash of everything an entry's meaning depends on beyond its digest (see the module docstring);
        recomputed when the controller's identity is (after the weights changed)."""
        controller = self._controller
        identity = controller.identity
        if self._model is None or self._model[0] is not identity:
            config = controller.config
            fields = type(controller.strategy).config_fields
            described = {
                "identity": identity.key(),
                "layers": [layer.name for layer in controller.layers],
                "strategy": config.strategy,
                "fields": {name: getattr(config, name) for name in fields if not name.startswith("shared_store")},
            }
            text = json.dumps(described, sort_keys=True, default=str).encode()
            self._model = (identity, hashlib.blake2b(text, digest_size=16).hexdigest())
        return self._model[1]

    def redis_key(self, bank: str, namespace: int, digest: bytes) -> str:
        strategy = self._controller.config.strategy
        return f"{self.settings.key_prefix}:v1:{self.model_key()}:{strategy}:{bank}:{namespace:016x}:{digest.hex()}"

    # --- the two calls strategies make ----------------------------------------------------------------------------
    def fill(
        self, bank: CacheBank, digests: list[bytes], namespace: int, check: Check
    ) -> list[tuple[bytes, int, dict[str, torch.Tensor]]]:
        """Ask Redis, in one round trip, for the ``digests`` ``bank`` lacks; put each valid value found into the
        bank. Returns ``(digest, entry id, stored values)`` of each entry put. A value that fails a check is a miss
        and is deleted from Redis."""
        wanted = [digest for digest in dict.fromkeys(digests) if bank.find(digest) is None]
        keys = [self.redis_key(bank.name, namespace, digest) for digest in wanted]
        found = self.client.mget(keys)
        if not found:
            return []
        filled, misses, refused = [], 0, 0
        for digest, key, data in zip(wanted, keys, found, strict=True):
            if data is None:
                misses += 1
                continue
            try:
                values, cost = decode(data, key, self._secret)
                self._check(bank, digest, values, check)
            except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as err:  # whatever is wrong: a miss
                refused += 1
                self.client.warn_refused(key, str(err))
                self.client.submit((key, None))
                continue
            entry_id = bank.put(values, digest=digest, cost=cost, namespace=namespace)
            stored = bank.get(entry_id) if entry_id is not None else None
            if stored is not None:
                filled.append((digest, entry_id, stored))
        self.client.count(shared_hits=len(filled), shared_misses=misses + refused, shared_refused=refused)
        return filled

    def write(self, bank: CacheBank, entry_id: int | None, digest: bytes, namespace: int, cost: float) -> None:
        """Queue the entry the strategy just stored in ``bank`` to be written to Redis in the background (its stored
        tensors are not changed afterwards; they are serialised in the writer thread)."""
        values = bank.get(entry_id) if entry_id is not None else None
        if values is None:
            return
        key, secret = self.redis_key(bank.name, namespace, digest), self._secret
        self.client.submit((key, lambda: encode(values, key, cost, secret)))

    # --- checks ---------------------------------------------------------------------------------------------------
    def _check(self, bank: CacheBank, digest: bytes, values: dict[str, torch.Tensor], check: Check) -> None:
        """``ValueError`` unless the value is an entry this model could have stored: the strategy's check of its
        fields and shapes, every float in the dtype the bank stores, and no NaN or infinity."""
        check(digest, values)
        dtype = bank.storage_dtype or getattr(torch, str(self._controller.identity.dtype), None)
        for name, tensor in values.items():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                raise ValueError(f"{name!r} is {tensor.dtype}; this model's entries hold {dtype}")
        _check_finite(values)

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
