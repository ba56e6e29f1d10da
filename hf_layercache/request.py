"""Per-request state: one :class:`RequestScope` per top-level forward call, kept thread-local.

Layer hooks need to know things only the model-level call knows (``output_attentions``, training mode, which
namespace, whether the user asked to bypass the cache) and to share state across the layers of one forward pass
(which rows hit). The scope is opened by the outermost wrapped forward and closed, and so reset, when it returns.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestScope:
    namespace: str
    """The key space the request's entries live in: its tenant's, plus the active adapter set's when one is active
    in the cached stacks (entries of one adapter set never serve another) and the numerics' when the call runs
    under ``torch.autocast`` or other float32 precision settings than torch's defaults
    (:func:`~hf_layercache.identity.numerics_state`)."""
    bypass_reason: str | None = None
    """Why this request runs uncached (``None``: it may use the cache)."""
    tenant: str = ""
    """The tenant's own namespace name (what ``stats()`` counts under)."""
    head_key: str = ""
    """The active adapter set of adapter layers outside the stacks' owners (heads): whole-model outputs depend on it."""
    state: dict[str, Any] = field(default_factory=dict)
    """The strategy's state for this forward pass (e.g. which rows hit in each layer stack)."""


MAX_NAMESPACE_LENGTH = 256
"""Most characters in a namespace (tenant) name. Names come from clients and are kept and repeated: up to
``MAX_TENANT_NAMES`` of them stay in memory for ``stats()``, every ``exact`` row key hashes its namespace, and they
are Prometheus label values and log text; a 1 MB name would cost that much per tenant and per request. 256 fits
what tenants are named by: UUIDs (36), e-mail addresses (at most 254), ``org/team/project`` paths."""

REPORT_PREFIX = "#"
"""Names that ``stats()`` and the metrics make up start with it (``#<tag>`` for a tenant this process has not
served, ``#other`` for tenants summed together), so no tenant's name may: it would be counted as one of those."""


def check_namespace(name: Any, field_name: str = "namespace") -> str:
    """``name`` if it can name a tenant, else ``ValueError`` naming ``field_name``, the value and what is allowed: a
    non-empty string of at most :data:`MAX_NAMESPACE_LENGTH` characters, not starting with :data:`REPORT_PREFIX`,
    without control characters (the key space of a tenant with active adapters is ``tenant + "\\x1f" + adapters``,
    so a tenant holding that separator could name another tenant's key space; a newline would also split log lines)
    or lone surrogates (not encodable, so not hashable into a key)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{field_name} must be a non-empty string, got {name!r}.")
    if len(name) > MAX_NAMESPACE_LENGTH:
        raise ValueError(
            f"{field_name} must be at most {MAX_NAMESPACE_LENGTH} characters, got one of {len(name)} "
            f"({name[:32]!r}...)."
        )
    if name.startswith(REPORT_PREFIX):
        raise ValueError(
            f"{field_name}={name!r} is not allowed: names starting with {REPORT_PREFIX!r} are the report's own "
            "('#<tag>', '#other'); choose another name."
        )
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        raise ValueError(
            f"{field_name}={name!r} contains the control character or surrogate {bad!r}; use printable characters."
        )
    return name


@functools.lru_cache(maxsize=1024)
def namespace_tag(namespace: str) -> int:
    """A stable 63-bit number for a namespace, stored with approximate entries so they are never served to another
    tenant (not Python's ``hash``: it is salted per process, and warm caches outlive processes). Remembered for the
    most recent namespaces: every request asks for its own at least once."""
    return int.from_bytes(hashlib.blake2b(namespace.encode(), digest_size=8).digest(), "little") >> 1


class _Local(threading.local):
    scope: RequestScope | None = None
    """The request this thread is in (``None``: none)."""


_local = _Local()


def current_scope() -> RequestScope | None:
    return _local.scope


class open_scope:
    """``with open_scope(scope):`` makes ``scope`` this thread's request scope for the enclosed code.

    A class, not a ``contextlib`` generator: it is entered once per request, and a generator-based context manager
    costs a generator and two resumptions, several microseconds of a cache hit."""

    __slots__ = ("previous", "scope")

    def __init__(self, scope: RequestScope):
        self.scope = scope

    def __enter__(self) -> RequestScope:
        self.previous = _local.scope
        _local.scope = self.scope
        return self.scope

    def __exit__(self, *exc: object) -> None:
        _local.scope = self.previous
