"""What one entry looks like in Redis: a frame around ``safetensors.torch.save`` bytes, signed when a key is set.

A value is ``MAGIC``, then ``b"S"`` and the 64 hex digits of an HMAC-SHA256 (:mod:`hf_layercache.integrity`) over
the Redis key and the payload, or ``b"U"`` when the writer had no key, then the payload. Signing the Redis key too
means a valid value copied under another key (another tenant's, another model's) is refused like a forged one.
A reader with a key refuses unsigned or wrongly signed values; one without a key trusts Redis as it trusts the
weights beside it. The payload is safetensors bytes (tensors only, nothing executable); its metadata holds the
entry's measured cost.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load, save

from ..integrity import sign, verify

MAGIC = b"hlc1"
_SIGNED, _UNSIGNED = b"S", b"U"
_SIGNATURE_CHARS = 64


def encode(values: dict[str, torch.Tensor], redis_key: str, cost: float, key: bytes | None) -> bytes:
    """The bytes stored under ``redis_key`` for an entry's tensors (copied to the CPU, contiguous)."""
    host = {name: t.detach().to("cpu").contiguous() for name, t in values.items()}
    payload = save(host, metadata={"cost": repr(float(cost))})
    if key is None:
        return MAGIC + _UNSIGNED + payload
    return MAGIC + _SIGNED + sign(key, redis_key.encode(), payload).encode() + payload


def decode(data: bytes, redis_key: str, key: bytes | None) -> tuple[dict[str, torch.Tensor], float]:
    """The tensors and cost in ``data``; ``ValueError`` saying why when it is not a value this reader may trust."""
    if not isinstance(data, bytes) or not data.startswith(MAGIC) or len(data) < len(MAGIC) + 1:
        raise ValueError("not a hf_layercache value (no 'hlc1' frame)")
    flag, rest = data[len(MAGIC) : len(MAGIC) + 1], data[len(MAGIC) + 1 :]
    if flag == _SIGNED:
        signature, payload = rest[:_SIGNATURE_CHARS], rest[_SIGNATURE_CHARS:]
        if key is not None and not verify(key, signature.decode("ascii", "replace"), redis_key.encode(), payload):
            raise ValueError("its HMAC signature does not match (another integrity_key, or the value was altered)")
    elif flag == _UNSIGNED:
        if key is not None:
            raise ValueError("it is unsigned and this replica has an integrity_key")
        payload = rest
    else:
        raise ValueError(f"unknown frame flag {flag!r}")
    try:
        values = load(payload)
    except Exception as err:  # safetensors raises its own error types, and OverflowError/ValueError on bad headers
        raise ValueError(f"its safetensors payload does not parse: {err}") from None
    return values, _cost(payload)


def _cost(payload: bytes) -> float:
    """The cost in the payload's metadata (``0.0`` when absent or not a finite non-negative number). The header is
    the JSON after the payload's first 8 bytes (its length), already checked by ``load``."""
    try:
        size = int.from_bytes(payload[:8], "little")
        value = float(json.loads(payload[8 : 8 + size]).get("__metadata__", {}).get("cost", "0"))
    except (ValueError, TypeError, AttributeError):
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0
