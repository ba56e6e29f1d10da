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

CACHED, DEFAULT, MEASURED = "cached", "default", "measured default"
"""Routes: the cached path; the default attention; the default attention, timed for the gate."""
_ALPHA = 0.3
"""Weight of a new measurement in the moving averages (about the last five calls count)."""
_WARMUP = 3
"""Cached calls a new bucket measures before deciding."""
_BACKOFF = 3
"""While off, each probe that finds no reuse doubles the calls to the next one, up to ``2**_BACKOFF`` intervals: on
traffic that never repeats, probes (a miss costs several defaults on short sequences) fade to a fraction of a
percent. A probe that hits, or caching turning on, goes back to one interval."""
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
        self.state = "on" if expected < self.default_seconds else "off"
        if self.state == "on":
            self.idle_probes = 0


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

    def route(self, length: int, rows: int) -> str:
        """The path of the next call of this length, for ``rows`` request rows: :data:`CACHED`, :data:`DEFAULT`, or
        :data:`MEASURED` (the default, to be timed with :meth:`record_default`: while learning, when caching
        re-measures it, and once per interval while off; other default calls cost no bookkeeping)."""
        if self.interval == 0:
            return CACHED
        with self._lock:
            bucket = self.buckets.setdefault(self.bucket_of(length), GateBucket())
            bucket.calls += 1
            if len(bucket.default_samples) < 2:
                bucket.bypassed += rows
                return MEASURED  # measure what the cache competes with first
            if bucket.state == "learning":
                return CACHED
            bucket.since_switch += 1
            wait = self.interval if bucket.state == "on" else self.interval << min(bucket.idle_probes, _BACKOFF)
            if bucket.since_switch < wait:
                if bucket.state == "on":
                    return CACHED
                bucket.bypassed += rows
                return MEASURED if bucket.since_switch == 1 else DEFAULT
            bucket.since_switch = 0
            if bucket.state == "off":
                bucket.probes += 1
                return CACHED
            bucket.bypassed += rows
            return MEASURED

    def record_default(self, length: int, rows: int, seconds: float) -> None:
        with self._lock:
            bucket = self.buckets[self.bucket_of(length)]
            bucket.default_samples = [*bucket.default_samples[1 - _DEFAULT_SAMPLES :], seconds / rows]
            bucket.default_seconds = min(bucket.default_samples)
            bucket.decide()

    def record_cached(
        self, length: int, rows: int, hits: int, searched: bool, overhead: float, serve: float, compute: float
    ) -> None:
        """A cached call: ``overhead`` seconds shared by every row (key, search, plans, checks), ``serve`` spent on
        its ``hits`` rows, ``compute`` on the others (attention and storing); ``searched``: the bank had entries."""
        if self.interval == 0:
            return
        with self._lock:
            bucket = self.buckets[self.bucket_of(length)]
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


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else (1.0 - _ALPHA) * previous + _ALPHA * value
