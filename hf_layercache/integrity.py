"""HMAC-SHA256 signatures for cache data that crosses a trust boundary (files on disk, values in a shared store).

Without a key a cache file is trusted like the weights beside it: digests inside the file catch accidents, not an
attacker, who can recompute them. With a key (``LayerCacheConfig.integrity_key`` or the ``HF_LAYERCACHE_INTEGRITY_KEY``
environment variable), writers sign what they write and readers refuse anything unsigned or wrongly signed.
"""

from __future__ import annotations

import hashlib
import hmac
import os

ENV_VAR = "HF_LAYERCACHE_INTEGRITY_KEY"


def resolve_key(configured: str | None) -> bytes | None:
    """The signing key: the configured one, else the environment variable's, else ``None`` (no signing)."""
    key = configured if configured is not None else os.environ.get(ENV_VAR)
    return key.encode("utf-8") if key else None


def sign(key: bytes, *parts: bytes) -> str:
    """Hex HMAC-SHA256 over ``parts``, each length-prefixed so no two different part lists sign alike."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return mac.hexdigest()


def verify(key: bytes, signature: object, *parts: bytes) -> bool:
    """Whether ``signature`` is :func:`sign` of ``parts`` under ``key`` (compared in constant time)."""
    return isinstance(signature, str) and hmac.compare_digest(signature, sign(key, *parts))
