"""The connection to Redis: one ``MGET`` per lookup, a bounded background writer, a breaker, and the counters.

Nothing here raises on the request path. Every Redis error is counted (``shared_errors``) and warned about once
per kind; a connection error or time-out also opens the breaker for ``retry_interval`` seconds, during which
lookups are skipped (``shared_skipped``) and writes are dropped (``shared_dropped``), so a Redis that is down costs
one time-out per interval. A Redis that answers with an error (``OOM`` when it is full and evicts nothing) stays in
use for reads; the refused writes are counted.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .settings import SharedSettings

INSTALL = "pip install 'hf-layercache[redis]'"
_BATCH = 64
"""Queued writes sent in one pipeline."""
_STOP = object()


@dataclass
class SharedCounters:
    shared_hits: int = 0
    """Entries a local miss found in Redis and served (valid, and signed where a key is set)."""
    shared_misses: int = 0
    """Entries asked of Redis that it did not have, or had in a form refused (see ``shared_refused``)."""
    shared_refused: int = 0
    """Values found but refused: unparsable, wrong shapes or dtypes, NaN/Inf, a bad or missing signature (each is
    deleted from Redis)."""
    shared_skipped: int = 0
    """Entries not asked of Redis because the breaker was open after an error."""
    shared_errors: int = 0
    """Redis errors: connection errors, time-outs, refused commands."""
    shared_bytes_read: int = 0
    shared_bytes_written: int = 0
    shared_dropped: int = 0
    """Computed entries not written: the queue was full or Redis was down."""


def _redis():
    try:
        import redis
    except ImportError:
        raise ImportError(f"shared_store needs the redis client (redis-py): {INSTALL}") from None
    return redis


class RedisClient:
    """A redis-py client for one :class:`SharedSettings`, with the breaker, the writer thread and the counters."""

    def __init__(self, settings: SharedSettings):
        redis = _redis()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.settings = settings
        password = None
        if settings.password_env is not None:
            password = os.environ.get(settings.password_env)
            if not password:
                raise ValueError(
                    f"shared_store_kwargs['password_env'] names {settings.password_env!r}, which is not set in the "
                    "environment; set it to the Redis password or drop password_env."
                )
        self.redis = redis.Redis.from_url(
            settings.url,
            password=password,
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=settings.connect_timeout,
            retry=Retry(NoBackoff(), 0),  # one try: the breaker, not a retry loop, handles a down Redis
            retry_on_timeout=False,
        )
        self._errors = (redis.RedisError, OSError)
        self._connection_errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self.counters = SharedCounters()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._warned: set[str] = set()
        self._queue: queue.Queue = queue.Queue(maxsize=settings.queue_size)
        self._writer = threading.Thread(
            target=_write_loop, args=(self._queue, weakref.ref(self)), name="hf_layercache-shared-writer", daemon=True
        )
        self._writer.start()
        weakref.finalize(self, self._queue.put, _STOP)
        _LIVE.add(self)

    # --- counters and the breaker ---------------------------------------------------------------------------------
    def count(self, **changes: int) -> None:
        with self._lock:
            for name, change in changes.items():
                setattr(self.counters, name, getattr(self.counters, name) + change)

    def report(self) -> dict[str, int]:
        with self._lock:
            return asdict(self.counters)

    def reset(self) -> None:
        with self._lock:
            self.counters = SharedCounters()

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, err: Exception, doing: str) -> None:
        """Count an error, warn once per kind, and open the breaker when the connection itself failed."""
        self.count(shared_errors=1)
        down = isinstance(err, self._connection_errors)
        if down:
            self._down_until = time.monotonic() + self.settings.retry_interval
        kind = f"{doing}:{type(err).__name__}"
        if kind not in self._warned:
            self._warned.add(kind)
            then = f"not asked for {self.settings.retry_interval:g} s; requests compute" if down else "continuing"
            warnings.warn(
                f"hf_layercache shared store {self._where()}: {doing} failed ({type(err).__name__}: {err}); {then}. "
                "Counted in stats()['shared']['shared_errors']; warned once per kind of error.",
                RuntimeWarning,
                stacklevel=3,
            )

    def warn_refused(self, key: str, why: str) -> None:
        if "refused" not in self._warned:
            self._warned.add("refused")
            warnings.warn(
                f"hf_layercache shared store {self._where()}: refused value {key!r}: {why}; served as a miss and "
                "deleted. Counted in stats()['shared']['shared_refused']; warned once.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _where(self) -> str:
        return self.settings.url

    # --- reads (on the request path) ------------------------------------------------------------------------------
    def mget(self, keys: list[str]) -> list[bytes | None] | None:
        """The values of ``keys`` in one round trip; ``None`` when Redis was not asked or failed."""
        if not keys:
            return []
        if not self.available():
            self.count(shared_skipped=len(keys))
            return None
        try:
            values = self.redis.mget(keys)
        except self._errors as err:
            self.failed(err, "reading")
            return None
        self.count(shared_bytes_read=sum(len(v) for v in values if v is not None))
        return values

    # --- writes (in the background) -------------------------------------------------------------------------------
    def submit(self, job: tuple[str, Callable[[], bytes] | None]) -> None:
        """Queue ``(key, make_value)`` to ``SET`` (``make_value`` runs in the writer thread) or ``(key, None)`` to
        ``DEL``; dropped, and counted, when the queue is full or Redis is down."""
        if job[1] is not None and not self.available():
            self.count(shared_dropped=1)
            return
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            if job[1] is not None:
                self.count(shared_dropped=1)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued write was sent (or dropped); ``False`` when ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self) -> None:
        """Stop the writer after what is queued; later writes are dropped."""
        self._queue.put(_STOP)
        self._writer.join(timeout=self.settings.socket_timeout * 4 + 1)
        self.redis.close()

    def send(self, jobs: list[tuple[str, Callable[[], bytes] | None]]) -> None:
        """Write ``jobs`` in one pipeline (called by the writer thread)."""
        if not self.available():
            self.count(shared_dropped=sum(1 for _, make in jobs if make is not None))
            return
        pipe = self.redis.pipeline(transaction=False)
        sizes = []
        for key, make in jobs:
            if make is None:
                pipe.delete(key)
                sizes.append(0)
                continue
            try:
                value = make()
            except (RuntimeError, ValueError) as err:  # an entry that cannot be serialised is not shared
                self.failed(err, "encoding")
                continue
            pipe.set(key, value, ex=self.settings.ttl)
            sizes.append(len(value))
        try:
            results = pipe.execute(raise_on_error=False)
        except self._errors as err:
            self.failed(err, "writing")
            self.count(shared_dropped=sum(1 for _, make in jobs if make is not None))
            return
        refused = [r for r in results if isinstance(r, Exception)]
        for err in refused[:1]:
            self.failed(err, "writing")  # e.g. OOM: Redis is full and its maxmemory-policy evicts nothing
        written = sum(size for size, r in zip(sizes, results, strict=True) if not isinstance(r, Exception))
        dropped = sum(1 for size, r in zip(sizes, results, strict=True) if size and isinstance(r, Exception))
        self.count(shared_errors=max(0, len(refused) - 1), shared_bytes_written=written, shared_dropped=dropped)


_LIVE: weakref.WeakSet[RedisClient] = weakref.WeakSet()


@atexit.register
def _stop_writers() -> None:
    """At interpreter exit, send what is queued and end every writer thread while Python still runs: a daemon thread
    woken during finalisation is unwound by ``pthread_exit``, which aborted the process ("terminate called without an
    active exception") in about 1 run in 16 here."""
    for client in list(_LIVE):
        if client._writer.is_alive():
            client.close()


def _write_loop(jobs: queue.Queue, owner: Callable[[], Any]) -> None:
    """The writer thread: send queued jobs in batches until stopped (or its client is gone)."""
    while True:
        job = jobs.get()
        batch = [job]
        while len(batch) < _BATCH:
            try:
                batch.append(jobs.get_nowait())
            except queue.Empty:
                break
        stop = any(j is _STOP for j in batch)
        work = [j for j in batch if j is not _STOP]
        client = owner()
        try:
            if work and client is not None:
                client.send(work)
        except Exception as err:  # the writer must outlive any one batch
            if client is not None:
                client.failed(err, "writing")
        finally:
            del client
            for _ in batch:
                jobs.task_done()
        if stop or owner() is None:
            return
