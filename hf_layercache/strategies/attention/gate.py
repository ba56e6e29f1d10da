"""The gate of one cached layer: per length bucket, whether the cached path can beat the model's default attention
(sdpa), decided from what each path measurably costs here and how often requests recently reused a map.

Why: a hit saves ``QK^T`` and the softmax, but the bookkeeping around it (lookup key, search, what moved,
verification) and a miss (the attention plus storing its entry) cost more than a fused sdpa kernel on short
sequences or on traffic that is never similar. Where the cached path cannot gain, the layer runs the model's own
attention with no bookkeeping at all, and takes the cached path once every ``attention_gate_interval`` calls (a
probe) to notice when traffic becomes reusable; while caching, it runs the default as often to keep measuring what
it competes with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

CACHED, DEFAULT, MEASURED, STORE = "cached", "default", "measured default", "store"
"""Routes: the cached path; the default attention; the default attention, timed for the gate; the attention
computed and stored without a lookup (a learning call or probe answered by an earlier layer, see :data:`NO_REUSE`)."""
NO_REUSE, REUSED, PROBE_HIT = "no reuse", "reused", "probe hit"
"""What the cached calls of the earlier layers of the same request found (:meth:`Gate.record_cached` returns it,
:func:`combine` adds it up): no row reused anything although the banks had entries; some layer reused; a probe (a
layer that was off) found reuse. A later layer's input mixes in more of the request than an earlier one's, so its
rows are no more alike: after :data:`NO_REUSE`, a layer that would learn or probe takes that as its answer and only
stores the rows (no lookup, no checks: about what the default costs), so that its bank holds them when the traffic
repeats; after :data:`PROBE_HIT`, a layer that is off probes at once, so that every layer meets reusable traffic in
the same request."""
_ALPHA = 0.3
"""Weight of a new measurement in the moving averages (about the last five calls count)."""
_WARMUP = 3
"""Cached calls a new bucket measures before deciding."""
_BACKOFF = 3
"""While off, each probe that finds no reuse doubles the calls to the next one, up to ``2**_BACKOFF`` intervals: on
traffic that never repeats, probes (a miss costs several defaults on short sequences) fade to a fraction of a
percent. A probe that hits, or caching turning on, goes back to one interval. While on, each re-measurement of the
default that confirms caching doubles the calls to the next one the same way: where a hit costs a sixth of the
default (SmolLM2 at 1,024 tokens), one default call per interval of 16 added a third to the average hit."""
_DEFAULT_SAMPLES = 5
"""The default's cost is the fastest of its last this many measurements (a preempted call must not make the default
look slow: the gate errs towards the default). A new bucket measures it twice before caching (the first call of a
shape is slower)."""


@dataclass
class GateBucket:
    """Measurements and decision of one layer for one length bucket. Seconds are per request row."""

    state: str = "learning"
    """``"learning"`` (measuring both paths), ``"on"`` (caching) or ``"off"`` (the model's default attention)."""
    calls: int = 0
    cached_calls: int = 0
    warmup: int = _WARMUP
    """Cached calls left to measure before the next decision (``learning``)."""
    probes: int = 0
    """Cached calls taken while off, to re-measure reuse."""
    idle_probes: int = 0
    """Probes in a row that found no reuse (each doubles the wait for the next, see ``_BACKOFF``)."""
    confirmed: int = 0
    """Re-measurements of the default in a row, while on, after which caching stayed on (each doubles the wait for
    the next, see ``_BACKOFF``)."""
    inferred: int = 0
    """Learning calls and probes answered by an earlier layer of the same request finding no reuse: the rows were
    computed and stored, not looked up."""
    bypassed: int = 0
    """Rows that ran the default attention because of this gate."""
    default_seconds: float | None = None
    default_samples: list[float] = field(default_factory=list)
    hit_seconds: float | None = None
    """A hit row on the cached path: its share of lookup and checks, and serving it."""
    miss_seconds: float | None = None
    """A missed row on the cached path: its share of lookup and checks, computing it, and storing its map."""
    reuse: float | None = None
    """Moving average of the fraction of rows that hit, on cached calls that had entries to look in (a miss into an
    empty bank says nothing about the traffic). Restarted when a probe finds reuse again: the traffic changed."""
    since_switch: int = 0
    """Calls since the last probe (off) or re-measurement of the default (on)."""

    @property
    def expected_seconds(self) -> float | None:
        """Per row, what the cached path is expected to cost at the recent reuse rate (``None``: not measured)."""
        if self.miss_seconds is None and self.hit_seconds is None:
            return None
        hit = self.hit_seconds if self.hit_seconds is not None else self.miss_seconds
        miss = self.miss_seconds if self.miss_seconds is not None else hit
        reuse = self.reuse or 0.0
        return reuse * hit + (1.0 - reuse) * miss

    def decide(self) -> None:
        expected = self.expected_seconds
        if self.warmup > 0 or expected is None or self.default_seconds is None:
            return
        was = self.state
        self.state = "on" if expected < self.default_seconds else "off"
        if self.state == "on":
            self.idle_probes = 0
        if self.state != was:
            self.confirmed = 0


class Gate:
    """Per length bucket (the next power of two of the sequence length), which path the layer takes.

    ``interval`` is ``attention_gate_interval``; 0 disables the gate (every call caches)."""

    def __init__(self, interval: int, clock: Callable[[], float] = time.perf_counter):
        self.interval = interval
        self.clock = clock
        """What the engine times both paths with (tests give it a clock of their own: decisions must not depend on
        how busy the machine is)."""
        self.buckets: dict[int, GateBucket] = {}
        self._lock = threading.Lock()

    @staticmethod
    def bucket_of(length: int) -> int:
        return 1 << max(length - 1, 0).bit_length()

    def route(self, length: int, rows: int, earlier: str | None = None) -> str:
        """The path of the next call of this length, for ``rows`` request rows: :data:`CACHED`, :data:`DEFAULT`, or
        :data:`MEASURED` (the default, to be timed with :meth:`record_default`: while learning, when caching
        re-measures it, and once per interval while off; other default calls cost no bookkeeping).

        ``earlier``: what an earlier layer's cached call of the same request found (:data:`NO_REUSE`,
        :data:`PROBE_HIT` or ``None``). After :data:`NO_REUSE`, a learning call or a probe is answered by it (a
        call that found no reuse, counted but not paid for: the default runs); after :data:`PROBE_HIT`, a layer
        that is off probes now, so that every layer stores and meets the reusable traffic in the same request."""
        if self.interval == 0:
            return CACHED
        with self._lock:
            bucket = self.buckets.setdefault(self.bucket_of(length), GateBucket())
            bucket.calls += 1
            if len(bucket.default_samples) < 2:
                bucket.bypassed += rows
                return MEASURED  # measure what the cache competes with first
            if bucket.state == "learning" and bucket.warmup == _WARMUP and self._nothing_reused_elsewhere(bucket):
                bucket.state, bucket.warmup = "off", 0  # probe, as the other buckets do, instead of learning
            if bucket.state == "learning":
                if earlier == NO_REUSE and bucket.miss_seconds is not None:
                    return self._inferred(bucket)
                return CACHED
            bucket.since_switch += 1
            backoff = bucket.confirmed if bucket.state == "on" else bucket.idle_probes
            wait = self.interval << min(backoff, _BACKOFF)
            probe = bucket.state == "off" and (bucket.since_switch >= wait or earlier == PROBE_HIT)
            if probe and earlier == NO_REUSE:
                bucket.since_switch = 0
                return self._inferred(bucket)
            if probe:
                bucket.since_switch = 0
                bucket.probes += 1
                return CACHED
            if bucket.since_switch < wait:
                if bucket.state == "on":
                    return CACHED
                bucket.bypassed += rows
                return MEASURED if bucket.since_switch == 1 else DEFAULT
            bucket.since_switch = 0
            bucket.bypassed += rows
            return MEASURED

    def _nothing_reused_elsewhere(self, bucket: GateBucket) -> bool:
        """Whether this layer has other buckets and every one of them is off for finding no reuse at all. Whether
        requests repeat is a property of the traffic, not of its length: a bucket about to learn then starts off
        instead (probing like the others), so that a length seldom seen (natural documents padded to their batch's
        longest, a batch shorter than half the usual length) does not pay two full cached calls and a learning
        request in the middle of traffic where nothing can hit. Caller holds the lock."""
        others = [other for other in self.buckets.values() if other is not bucket]
        return bool(others) and all(other.state == "off" and other.reuse == 0.0 for other in others)

    @staticmethod
    def _inferred(bucket: GateBucket) -> str:
        """A learning call or probe answered by an earlier layer's :data:`NO_REUSE`: it counts as a cached call that
        found no reuse (at the miss cost measured before), and the rows are only computed and stored. Caller holds
        the lock."""
        bucket.inferred += 1
        if bucket.state == "learning":
            bucket.warmup -= 1
        else:
            bucket.idle_probes += 1
        bucket.reuse = _average(bucket.reuse, 0.0)
        bucket.decide()
        return STORE

    def record_default(self, length: int, rows: int, seconds: float) -> None:
        with self._lock:
            bucket = self.buckets[self.bucket_of(length)]
            bucket.default_samples = [*bucket.default_samples[1 - _DEFAULT_SAMPLES :], seconds / rows]
            bucket.default_seconds = min(bucket.default_samples)
            was = bucket.state
            bucket.decide()
            if was == bucket.state == "on":
                bucket.confirmed += 1

    def record_cached(
        self, length: int, rows: int, hits: int, searched: bool, overhead: float, serve: float, compute: float
    ) -> str | None:
        """A cached call: ``overhead`` seconds shared by every row (key, search, plans, checks), ``serve`` spent on
        its ``hits`` rows, ``compute`` on the others (attention and storing); ``searched``: the bank had entries.
        Returns what the later layers of the request may go by (``earlier`` of :meth:`route`)."""
        if self.interval == 0:
            return None
        with self._lock:
            bucket = self.buckets[self.bucket_of(length)]
            found = (PROBE_HIT if bucket.state == "off" else REUSED) if hits else (NO_REUSE if searched else None)
            bucket.cached_calls += 1
            share = overhead / rows
            if hits:
                bucket.hit_seconds = _average(bucket.hit_seconds, share + serve / hits)
            if rows - hits:
                bucket.miss_seconds = _average(bucket.miss_seconds, share + compute / (rows - hits))
            # a probe that found reuse decides at once from what it measured, with no second learning phase: where
            # hits are found but cost more than the default, every probe would otherwise pay for three cached calls
            if bucket.state == "off":
                bucket.idle_probes = 0 if hits else bucket.idle_probes + 1
                if hits:
                    bucket.reuse = None
            elif bucket.state == "learning":
                bucket.warmup -= 1
            if searched:
                bucket.reuse = _average(bucket.reuse, hits / rows)
            bucket.decide()
            return found

    def report(self) -> dict[int, dict]:
        """Per bucket, its state and measurements (seconds per row), for ``stats()``."""
        with self._lock:
            return {
                size: {**asdict(b), "expected_seconds": b.expected_seconds} for size, b in sorted(self.buckets.items())
            }

    def reset(self) -> None:
        """Forget every decision: the entries they were based on are gone (``clear()``)."""
        with self._lock:
            self.buckets.clear()


_RANK = {None: 0, NO_REUSE: 1, REUSED: 2, PROBE_HIT: 3}


def combine(earlier: str | None, found: str | None) -> str | None:
    """What the later layers go by after a layer found ``found``: any reuse in the request outweighs no reuse."""
    return max(earlier, found, key=_RANK.__getitem__)


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else (1.0 - _ALPHA) * previous + _ALPHA * value
