"""The connection to Redis: one pipelined read per lookup, a bounded background writer, a breaker, the counters.

Nothing here raises on the request path. Every failure is counted (``shared_errors``) and warned about once per
kind, whatever raised it: redis-py lets a peer's reply of an unexpected shape (a proxy or impostor answering
``HELLO`` with an integer, a read with a map) escape as ``AttributeError`` or ``TypeError``, so catching only
``RedisError`` was not enough. Anything but an error reply (a connection error, a time-out, a reply of the wrong
shape) also opens the breaker for ``retry_interval`` seconds and closes the idle connections (one may hold unread
replies), during which lookups are skipped (``shared_skipped``) and writes are dropped (``shared_dropped``), so a
Redis that is down or speaks garbage costs one failure per interval. A Redis that answers with an error (``OOM``
when it is full and evicts nothing) stays in use for reads; the refused writes are counted.

Both directions are bounded in bytes: a read fetches at most ``limit + 1`` bytes of each value (``GETRANGE``), and
the write-behind queue holds at most ``queue_bytes`` of entry tensors, queued or being sent.
"""

from __future__ import annotations

import atexit
import contextlib
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

Job = tuple[str, Callable[[], bytes] | None, int]
"""``(key, make_value, nbytes)``: ``SET key make_value()`` (run in the writer thread), holding ``nbytes`` of entry
tensors until sent; or ``(key, None, 0)``: ``DEL key``."""


class ReplyError(Exception):
    """A reply of the wrong shape or count: the peer does not answer as Redis does (a broken proxy, an impostor)."""


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
    """Failures: connection errors, time-outs, refused commands, replies of the wrong shape, and any other exception
    inside the tier (each lookup it hit is a miss, each write a drop)."""
    shared_bytes_read: int = 0
    shared_bytes_written: int = 0
    shared_dropped: int = 0
    """Computed entries not written: the queue was full (``queue_size`` entries or ``queue_bytes`` of tensors), the
    value was over ``max_value_bytes``, or Redis was down."""
    shared_oversized: int = 0
    """Values longer than the lookup's bound (``max_value_bytes``, or the bank's share of ``max_memory``): misses,
    of which at most the bound's bytes were read (also counted in ``shared_misses``)."""


def _redis():
    try:
        import redis
    except ImportError:
        raise ImportError(f"shared_store needs the redis client (redis-py): {INSTALL}") from None
    return redis


class RedisClient:
    """A redis-py client for one :class:`SharedSettings`, with the breaker, the writer thread and the counters."""

    def __init__(self, settings: SharedSettings, queue_bytes: int):
        """``queue_bytes``: what the write-behind queue may hold (``settings.queue_bytes`` resolved by the tier)."""
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
        self._error_reply = redis.ResponseError
        self.queue_bytes = queue_bytes
        self._held = 0
        """Bytes of entry tensors submitted and not yet sent (or dropped)."""
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

    def failed(self, err: Exception, doing: str, down: bool | None = None) -> None:
        """Count an error and warn once per kind. Unless it was an error reply (or ``down`` is ``False``: a local
        failure), open the breaker and close the idle connections, which may hold the rest of a garbled reply."""
        self.count(shared_errors=1)
        if down is None:
            down = not isinstance(err, self._error_reply)
        if down:
            self._down_until = time.monotonic() + self.settings.retry_interval
            with contextlib.suppress(Exception):  # closing the sockets of a broken peer: nothing more to do
                self.redis.connection_pool.disconnect(inuse_connections=False)
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

    def warn_refused(self, key: str, why: str, kind: str = "refused", then: str = "deleted") -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"hf_layercache shared store {self._where()}: refused value {key!r}: {why}; served as a miss and "
                f"{then}. Counted in stats()['shared']['shared_{kind}']; warned once.",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def queued_bytes(self) -> int:
        """Bytes of entry tensors waiting to be written or being sent (at most :attr:`queue_bytes`)."""
        with self._lock:
            return self._held

    def _where(self) -> str:
        return self.settings.url

    # --- reads (on the request path) ------------------------------------------------------------------------------
    def read(self, keys: list[str], limit: int) -> list[bytes | None] | None:
        """The values of ``keys`` in one round trip, ``None`` for an absent key and for a value longer than
        ``limit`` bytes (``shared_oversized``); ``None`` in place of the list when Redis was not asked or failed.

        One pipeline of ``GETRANGE key 0 limit``: an oversized value costs ``limit + 1`` bytes, not its length (an
        ``MGET`` sent all 256 MB of a planted value, 1.4-2.6 s, before it was refused). ``GETRANGE`` answers an
        absent key with an empty string, which no value is (values start with the codec's frame). The pipeline ends
        with ``ECHO <nonce>``: a connection that held a previous reply, or a peer that answers a command twice,
        shifts the replies, which would serve one key's value under another; the nonce out of place shows it."""
        if not keys:
            return []
        if not self.available():
            self.count(shared_skipped=len(keys))
            return None
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.getrange(key, 0, limit)
            nonce = os.urandom(8).hex().encode()
            pipe.echo(nonce)
            *replies, echoed = _replies(pipe.execute(raise_on_error=False), len(keys) + 1, bytes)
            if echoed != nonce:
                raise ReplyError("the replies are out of step with the commands (the closing ECHO came back wrong)")
        except Exception as err:  # whatever the peer sent: a miss (see the module docstring)
            self.failed(err, "reading")
            return None
        values: list[bytes | None] = []
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, Exception):  # e.g. WRONGTYPE: another application's key of another type
                self.failed(reply, "reading")
                reply = None
            elif reply is not None and len(reply) > limit:
                self.count(shared_oversized=1)
                self.warn_refused(key, f"longer than {limit} bytes", "oversized", f"not read past {limit + 1} bytes")
                reply = None
            values.append(reply or None)
        self.count(shared_bytes_read=sum(len(r) for r in replies if isinstance(r, bytes)))
        return values

    # --- writes (in the background) -------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a :data:`Job`; a write is dropped, and counted, when Redis is down or the queue has no room for
        it (``queue_size`` jobs, or ``queue_bytes`` of tensors queued or being sent: the tensors a job holds stay
        in memory after the bank evicts the entry)."""
        _, make, nbytes = job
        if make is not None and not self.available():
            self.count(shared_dropped=1)
            return
        with self._lock:
            if make is not None and self._held + nbytes > self.queue_bytes:
                self.counters.shared_dropped += 1
                return
            self._held += nbytes
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.sent(nbytes)
            if make is not None:
                self.count(shared_dropped=1)

    def sent(self, nbytes: int) -> None:
        """Release ``nbytes`` of the queue's budget (a job was sent or dropped)."""
        with self._lock:
            self._held -= nbytes

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

    def send(self, jobs: list[Job]) -> None:
        """Write ``jobs`` in one pipeline (called by the writer thread)."""
        if not self.available():
            self.count(shared_dropped=sum(1 for _, make, _ in jobs if make is not None))
            return
        pipe = self.redis.pipeline(transaction=False)
        sizes, dropped = [], 0
        for key, make, _ in jobs:
            if make is None:
                pipe.delete(key)
                sizes.append(0)
                continue
            try:
                value = make()
            except Exception as err:  # an entry that cannot be serialised is not shared
                self.failed(err, "encoding", down=False)
                dropped += 1
                continue
            if len(value) > self.settings.max_value_bytes:  # the replicas would not read it
                dropped += 1
                continue
            pipe.set(key, value, ex=self.settings.ttl)
            sizes.append(len(value))
        try:
            results = _replies(pipe.execute(raise_on_error=False), len(sizes), bool | int)  # SET: True, DEL: 0/1
        except Exception as err:  # whatever the peer sent (see the module docstring)
            self.failed(err, "writing")
            self.count(shared_dropped=dropped + sum(1 for size in sizes if size))
            return
        done = [r is True if size else not isinstance(r, Exception) for size, r in zip(sizes, results, strict=True)]
        failed = [r for r, ok in zip(results, done, strict=True) if not ok]
        failures = [r if isinstance(r, Exception) else ReplyError(f"SET answered {r!r}") for r in failed]
        for err in failures[:1]:
            self.failed(err, "writing")  # e.g. OOM: Redis is full and its maxmemory-policy evicts nothing
        written = sum(size for size, ok in zip(sizes, done, strict=True) if size and ok)
        dropped += sum(1 for size, ok in zip(sizes, done, strict=True) if size and not ok)
        self.count(shared_errors=max(0, len(failures) - 1), shared_bytes_written=written, shared_dropped=dropped)


def _replies(replies: Any, n: int, expected: Any) -> list[Any]:
    """The ``n`` replies of a pipeline, each ``None``, an error reply or of the ``expected`` type (redis-py hands on
    whatever the peer sent); :class:`ReplyError` else."""
    if not isinstance(replies, list) or len(replies) != n:
        raise ReplyError(f"expected a list of {n} replies, got {type(replies).__name__}")
    for reply in replies:
        if not (reply is None or isinstance(reply, expected | Exception)):
            raise ReplyError(f"a reply of type {type(reply).__name__} where {expected} was due")
    return replies


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
            if client is not None:
                client.sent(sum(nbytes for _, _, nbytes in work))
            del client
            for _ in batch:
                jobs.task_done()
        if stop or owner() is None:
            return
