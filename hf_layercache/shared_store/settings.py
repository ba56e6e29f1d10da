"""The shared store's settings: its URL and ``shared_store_kwargs``, checked without importing redis or torch.

``LayerCacheConfig.__post_init__`` calls :func:`parse_settings`, so a bad URL or a misspelt kwarg fails when the
config is built, on a machine without the ``redis`` client too (the ``hf-layercache`` command reads configs without
torch). The URL is written with the config into a warm cache's JSON, so it may not carry a password: the password
comes from an environment variable named by ``password_env``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

SCHEMES = ("redis", "rediss", "unix")
"""``redis://host:port/db``, ``rediss://`` (TLS), ``unix:///path/to/socket``: what redis-py's ``from_url`` reads."""
DEFAULT_BYTES = 64 * 2**20
"""``max_value_bytes``'s default and the most ``queue_bytes=None`` allows: 64 MiB."""


@dataclass(frozen=True)
class SharedSettings:
    """A shared store's URL and the options of ``shared_store_kwargs`` (documented in docs/shared.md)."""

    url: str
    socket_timeout: float = 0.25
    """Seconds one socket operation (a read or write of the connection) may wait; a request waits on Redis at most
    this long per stalled operation before it computes as uncached."""
    connect_timeout: float = 0.25
    """Seconds to open a connection."""
    retry_interval: float = 5.0
    """After a connection error or time-out, seconds during which Redis is not asked at all (requests compute), so
    a down Redis costs at most one time-out per interval, not one per request."""
    ttl: int | None = None
    """Seconds an entry lives in Redis; ``None`` leaves expiry to Redis's ``maxmemory-policy`` (``allkeys-lru``)."""
    password_env: str | None = None
    """Name of the environment variable holding the Redis password (``AUTH``); never the password itself."""
    key_prefix: str = "hf_layercache"
    """First part of every Redis key, to share a Redis with other applications."""
    queue_size: int = 256
    """Entries waiting to be written in the background; a computed entry that finds the queue full is not shared
    (counted as ``shared_dropped``) rather than making the request wait."""
    queue_bytes: int | None = None
    """Bytes of entry tensors the write-behind queue may hold (queued or being sent): a computed entry that does
    not fit is not shared (``shared_dropped``). A count alone let a slow Redis pin many times ``max_memory`` in
    tensors the banks had already evicted. ``None``: the cache's ``max_memory``, at most ``DEFAULT_BYTES``."""
    max_value_bytes: int = DEFAULT_BYTES
    """Largest value read or written. A lookup reads at most this many bytes of a value (fewer when the bank's
    share of ``max_memory`` is smaller: a larger entry could not be kept), so a huge value planted under a key a
    request reads costs a bounded transfer, not seconds; it is a miss (``shared_oversized``)."""


_POSITIVE = ("socket_timeout", "connect_timeout", "retry_interval")
OPTIONS = tuple(f.name for f in fields(SharedSettings) if f.name != "url")


def parse_settings(url: Any, kwargs: Any) -> SharedSettings:
    """The settings of ``shared_store=url, shared_store_kwargs=kwargs``; ``ValueError`` naming what is wrong."""
    _check_url(url)
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"shared_store_kwargs must be a dict with string keys, got {kwargs!r}.")
    unknown = sorted(set(kwargs) - set(OPTIONS))
    if unknown:
        named = ", ".join(
            f"{k!r}" + "".join(f" (did you mean {h!r}?)" for h in difflib.get_close_matches(k, OPTIONS, n=1))
            for k in unknown
        )
        raise ValueError(f"shared_store_kwargs has unknown option {named}; allowed: {', '.join(OPTIONS)}.")
    for name in _POSITIVE:
        value = kwargs.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise ValueError(f"shared_store_kwargs[{name!r}] must be a positive number of seconds, got {value!r}.")
    ttl = kwargs.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1):
        raise ValueError(f"shared_store_kwargs['ttl'] must be a positive int of seconds or None, got {ttl!r}.")
    for name in ("queue_size", "queue_bytes", "max_value_bytes"):
        size = kwargs.get(name, 1)
        if size is None and name == "queue_bytes":
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"shared_store_kwargs[{name!r}] must be a positive int, got {size!r}.")
    env = kwargs.get("password_env")
    if env is not None and (not isinstance(env, str) or not env or "=" in env):
        raise ValueError(f"shared_store_kwargs['password_env'] must name an environment variable, got {env!r}.")
    prefix = kwargs.get("key_prefix", "hf_layercache")
    if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
        raise ValueError(f"shared_store_kwargs['key_prefix'] must be a non-empty string, no spaces; got {prefix!r}.")
    return SharedSettings(url, **kwargs)


def _check_url(url: Any) -> None:
    if not isinstance(url, str):
        raise ValueError(f"shared_store must be a URL string such as 'redis://localhost:6379/0', got {url!r}.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a non-numeric port raises here
    except ValueError as err:
        raise ValueError(f"shared_store is not a valid URL: {err}.") from None
    if parts.password is not None or "password=" in parts.query:  # checked first: the messages below show the URL
        raise ValueError(
            "shared_store must not contain a password (the URL is saved with the config); put it in an environment "
            "variable and name that in shared_store_kwargs={'password_env': 'REDIS_PASSWORD'}."
        )
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"shared_store={url!r} has scheme {parts.scheme!r}; use one of {', '.join(s + '://' for s in SCHEMES)} "
            "(e.g. 'redis://localhost:6379/0', 'rediss://host:6380/0' for TLS, 'unix:///run/redis.sock')."
        )
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"shared_store={url!r} names no socket path; write 'unix:///path/to/redis.sock'.")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"shared_store={url!r} names no host; write e.g. 'redis://localhost:6379/0'.")
