"""Requests in flight and the reconfigurations that must not cut through them.

A serving process reconfigures its cache while other threads serve: ``disable()`` and ``enable()``, ``clear()``,
``save_pretrained``, loading a warm cache, ``copy.deepcopy``. A request reads the banks, the hooks and its own
per-layer state from its first layer to its last; a switch in between would leave it half served by one
configuration and half computed by another (a stack's skipped layers recomputed on a passed-through state, a freed
prefix slot read after it was reused). So requests run side by side, and a reconfiguration waits until the requests
in flight have ended, while the requests that arrive meanwhile wait for it: each request runs on one configuration.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class InFlightRequests:
    """A readers-writer gate: requests share it, a reconfiguration holds it alone (and the requests it makes itself,
    e.g. a warm-up, pass)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._running = 0
        self._writer: int | None = None
        """The thread reconfiguring, or waiting to: new requests wait until it is done."""
        self._depth = 0
        """How many nested ``reconfiguration()`` blocks the writer is in."""
        self._local = threading.local()

    @property
    def reconfiguring(self) -> bool:
        """Whether a reconfiguration holds the gate or waits for the requests in flight."""
        return self._writer is not None

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """One request's time in the model."""
        me = threading.get_ident()
        with self._condition:
            if self._writer != me:
                self._condition.wait_for(lambda: self._writer is None)
            self._running += 1
        self._local.requests = getattr(self._local, "requests", 0) + 1
        try:
            yield
        finally:
            self._local.requests -= 1
            with self._condition:
                self._running -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def reconfiguration(self, what: str) -> Iterator[None]:
        """``what`` (e.g. ``"clear()"``) alone: once the requests in flight have ended, before any new one starts."""
        me = threading.get_ident()
        if getattr(self._local, "requests", 0) and self._writer != me:
            raise RuntimeError(
                f"{what} was called from inside a request of the same model (a hook or callback in its forward): it "
                "would wait for that request to end. Call it between requests."
            )
        with self._condition:
            if self._writer != me:
                self._condition.wait_for(lambda: self._writer is None)
                self._writer = me
                self._condition.wait_for(lambda: self._running == 0)
            self._depth += 1
        try:
            yield
        finally:
            with self._condition:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                    self._condition.notify_all()
