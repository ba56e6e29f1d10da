"""Requests in flight and the reconfigurations that must not cut through them.

A serving process reconfigures its cache while other threads serve: ``disable()`` and ``enable()``, ``clear()``,
``save_pretrained``, loading a warm cache, ``copy.deepcopy``. A request reads the banks, the hooks and its own
per-layer state from its first layer to its last; a switch in between would leave it half served by one
configuration and half computed by another (a stack's skipped layers recomputed on a passed-through state, a freed
prefix slot read after it was reused). So requests run side by side, and a reconfiguration waits until the requests
in flight have ended, while the requests that arrive meanwhile wait for it: each request runs on one configuration.

A request enters and leaves the gate once per call, cache hits included, so the gate is a plain lock around two
counter updates, with a class as its context manager: a request waits (on the condition) only while a
reconfiguration holds the gate or waits for it, and wakes that reconfiguration only when there is one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class _Local(threading.local):
    requests = 0
    """How many requests of this gate this thread is in (nested models share a thread)."""


class InFlightRequests:
    """A readers-writer gate: requests share it, a reconfiguration holds it alone (and the requests it makes itself,
    e.g. a warm-up, pass)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)
        self._running = 0
        self._writer: int | None = None
        """The thread reconfiguring, or waiting to: new requests wait until it is done."""
        self._depth = 0
        """How many nested ``reconfiguration()`` blocks the writer is in."""
        self._local = _Local()
        self._request = _Request(self)

    @property
    def reconfiguring(self) -> bool:
        """Whether a reconfiguration holds the gate or waits for the requests in flight."""
        return self._writer is not None

    def request(self) -> _Request:
        """One request's time in the model: ``with gate.request():``."""
        return self._request

    def _enter(self) -> None:
        with self._lock:
            writer = self._writer
            if writer is not None and writer != threading.get_ident():
                self._condition.wait_for(lambda: self._writer is None)
            self._running += 1
        self._local.requests += 1

    def _exit(self) -> None:
        self._local.requests -= 1
        with self._lock:
            self._running -= 1
            if self._writer is not None:  # only a reconfiguration waits for requests to end
                self._condition.notify_all()

    @contextlib.contextmanager
    def reconfiguration(self, what: str) -> Iterator[None]:
        """``what`` (e.g. ``"clear()"``) alone: once the requests in flight have ended, before any new one starts."""
        me = threading.get_ident()
        if self._local.requests and self._writer != me:
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


class _Request:
    """The context manager of :meth:`InFlightRequests.request` (one per gate: its state is the gate's and the
    thread's). A class, not a ``contextlib`` generator: a generator and its two resumptions cost microseconds of a
    cache hit."""

    __slots__ = ("_enter", "_exit")

    def __init__(self, gate: InFlightRequests):
        self._enter = gate._enter
        self._exit = gate._exit

    def __enter__(self) -> None:
        self._enter()

    def __exit__(self, *exc: object) -> None:
        self._exit()
