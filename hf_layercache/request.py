"""Per-request state: one :class:`RequestScope` per top-level forward call, kept thread-local.

Layer hooks need to know things only the model-level call knows (``output_attentions``, training mode, which
namespace, whether the user asked to bypass the cache) and to share state across the layers of one forward pass
(which rows hit). The scope is opened by the outermost wrapped forward and closed, and so reset, when it returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_local = threading.local()


@dataclass
class RequestScope:
    namespace: str
    """The key space the request's entries live in: its tenant's, plus the active adapter set's when one is active
    in the cached stacks (entries of one adapter set never serve another)."""
    bypass_reason: str | None = None
    """Why this request runs uncached (``None``: it may use the cache)."""
    tenant: str = ""
    """The tenant's own namespace name (what ``stats()`` counts under)."""
    head_key: str = ""
    """The active adapter set of adapter layers outside the stacks' owners (heads): whole-model outputs depend on it."""
    state: dict[str, Any] = field(default_factory=dict)
    """The strategy's state for this forward pass (e.g. which rows hit in each layer stack)."""


def namespace_tag(namespace: str) -> int:
    """A stable 63-bit number for a namespace, stored with approximate entries so they are never served to another
    tenant (not Python's ``hash``: it is salted per process, and warm caches outlive processes)."""
    return int.from_bytes(hashlib.blake2b(namespace.encode(), digest_size=8).digest(), "little") >> 1


def current_scope() -> RequestScope | None:
    return getattr(_local, "scope", None)


@contextlib.contextmanager
def open_scope(scope: RequestScope) -> Iterator[RequestScope]:
    previous = current_scope()
    _local.scope = scope
    try:
        yield scope
    finally:
        _local.scope = previous
