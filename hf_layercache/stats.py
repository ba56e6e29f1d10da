"""Counters per cached layer and the report behind ``model.layer_cache.stats()``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from .events import Verdict


@dataclass
class LayerCounters:
    lookups: int = 0
    """Rows that asked this layer's cache for an entry (prefix: tokens)."""
    hits: int = 0
    """Rows served from the cache (the layer did not compute them)."""
    partial_hits: int = 0
    """Of ``hits``, rows served in part: the layer computed the tokens they add to the entry's (semantic)."""
    misses: int = 0
    """Rows a lookup found nothing to serve for (verified hits included: they are computed)."""
    computed: int = 0
    """Rows the layer computed: its misses, and rows of layers that compute without a lookup (a fingerprint's
    probe layers). The measured cost of a row is ``compute_seconds / computed``."""
    bypassed: int = 0
    """Rows that ran uncached because of the request (training, ``output_attentions``, ``bypass()``, decode step)."""
    compute_seconds: float = 0.0
    """Wall-clock seconds spent computing missed rows (the estimate of what a hit saves is built from it)."""
    seconds_saved: float = 0.0
    """Estimated compute seconds hits avoided: hits times the layer's measured seconds per computed row (measured in
    this process, or by the process that filled a loaded warm cache, see :meth:`CacheStats.timing`)."""
    verified: int = 0
    """Approximate hits that were checked by computing the layer anyway (divergence monitoring)."""
    error_sum: float = 0.0
    """Sum of the relative errors those checks measured (see ``mean_error``)."""
    max_error: float = 0.0
    """Largest relative error a check measured."""
    audited: int = 0
    """Verified hits that would have been served (drawn by ``verify_fraction``): an unbiased sample of served hits."""
    audited_unacceptable: int = 0
    """Of those, hits the strategy judged unacceptable (semantic: by ``acceptance``; see ``observed_error_rate``)."""
    explored: int = 0
    """Candidate hits checked before deciding to serve them: ``max_error_rate``'s explorations (computed, as it could
    not yet vouch for them) and the attention strategy's row checks."""
    explored_unacceptable: int = 0
    """Of those, hits that would have been unacceptable."""

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def mean_error(self) -> float:
        return self.error_sum / self.verified if self.verified else 0.0

    @property
    def observed_error_rate(self) -> float:
        """Unacceptable share of the audited hits: the estimate of how often a served hit is unacceptable."""
        return self.audited_unacceptable / self.audited if self.audited else 0.0


MAX_TENANT_NAMES = 10_000
"""Tenant names remembered (beyond them, tags show as ``#<tag>``): bounded against clients that send endless
namespaces."""

OTHER_TENANTS = "#other"
"""The report's name for tenants counted together: those beyond :data:`MAX_TENANT_NAMES` in ``stats()``, and those
without a label of their own in the Prometheus metrics. It starts with ``#``, which no tenant's name may
(:func:`~hf_layercache.request.check_namespace`), so it never merges with a real tenant (``"other"`` is one)."""


class CacheStats:
    """Thread-safe counters: one :class:`LayerCounters` per cached layer name, and hits and misses per tenant."""

    def __init__(self, layer_names: list[str], default_tenant: str = "default"):
        self._lock = threading.Lock()
        self.layers = {name: LayerCounters() for name in layer_names}
        self.tenants: dict[str, list[int]] = {default_tenant: [0, 0]}
        """Per tenant name this process served (at most :data:`MAX_TENANT_NAMES`): its ``[hits, misses]``, counted
        like the per-layer totals."""
        self._unnamed = [0, 0]
        """``[hits, misses]`` of tenants beyond :data:`MAX_TENANT_NAMES` (:data:`OTHER_TENANTS` in the report), so
        the tenants' counts still add up to the totals."""
        self.key_spaces: dict[int, str] = {}
        """Tags of the key spaces tenants used with adapters active, to their tenant's name."""
        self._measured: dict[str, tuple[int, float]] = {}
        """Per layer, rows and seconds computed before these counters started: by the process that filled a loaded
        warm cache, or before ``clear()``. A warm cache at 100% hits still knows what a hit saves."""
        self.invalidations = 0
        """Times every entry was dropped because the model's function changed under the cache (``watch.py``)."""

    def record_lookup(
        self,
        layers: list[str],
        hits: int,
        misses: int,
        tenant: str | None = None,
        partial: Sequence[float] = (),
    ) -> None:
        """What a lookup decided for each of ``layers`` (see :class:`~hf_layercache.events.Lookup`), counted for
        ``tenant`` too (once per layer, like the totals) when it is a remembered tenant. ``partial``: the computed
        share of each hit served in part, which its saved seconds leave out."""
        saved_rows = hits - sum(partial)
        with self._lock:
            for layer in layers:
                counters = self.layers[layer]
                counters.lookups += hits + misses
                counters.hits += hits
                counters.partial_hits += len(partial)
                counters.misses += misses
                counters.seconds_saved += saved_rows * self._seconds_per_row(layer)
            traffic = self.tenants.get(tenant, self._unnamed) if tenant is not None else None
            if traffic is not None:
                traffic[0] += hits * len(layers)
                traffic[1] += misses * len(layers)

    def remember_tenant(self, tenant: str, key_space: int | None = None) -> None:
        """Count ``tenant``'s lookups from now on (and name its adapter key space's tag ``key_space`` after it),
        unless :data:`MAX_TENANT_NAMES` are known already."""
        if tenant not in self.tenants and len(self.tenants) < MAX_TENANT_NAMES:
            with self._lock:
                self.tenants.setdefault(tenant, [0, 0])
        if key_space is not None and key_space not in self.key_spaces and len(self.key_spaces) < MAX_TENANT_NAMES:
            with self._lock:
                self.key_spaces.setdefault(key_space, tenant)

    def tenant_report(self, tags: dict[int, int], tag_of: Callable[[str], int]) -> dict[str, dict[str, int]]:
        """Entries, hits and misses per tenant name; ``tags`` are the banks' entries per namespace tag, named with
        ``tag_of`` (tenants this process has not served show as ``#<tag>``, with entries only; those beyond
        :data:`MAX_TENANT_NAMES` as :data:`OTHER_TENANTS`)."""
        with self._lock:
            traffic = {name: tuple(counts) for name, counts in self.tenants.items()}
            names = {**self.key_spaces, **{tag_of(name): name for name in traffic}}
            traffic[OTHER_TENANTS] = tuple(self._unnamed)
        report: dict[str, dict[str, int]] = {
            name: {"entries": 0, "hits": hits, "misses": misses}
            for name, (hits, misses) in traffic.items()
            if hits or misses
        }
        for tag, count in tags.items():
            report.setdefault(names.get(tag, f"#{tag:016x}"), {"entries": 0})["entries"] += count
        return report

    def record_compute(self, layer: str, rows: int, seconds: float) -> None:
        """``layer`` computed ``rows`` in ``seconds``."""
        with self._lock:
            counters = self.layers[layer]
            counters.computed += rows
            counters.compute_seconds += seconds

    def record_verdict(self, layer: str, verdict: Verdict) -> None:
        """A verified hit (see :class:`~hf_layercache.events.Verdict`)."""
        with self._lock:
            counters = self.layers[layer]
            counters.verified += 1
            counters.error_sum += verdict.error
            counters.max_error = max(counters.max_error, verdict.error)
            if verdict.explored:
                counters.explored += 1
                counters.explored_unacceptable += not verdict.acceptable
            else:
                counters.audited += 1
                counters.audited_unacceptable += not verdict.acceptable

    def record_bypass(self, layer: str, rows: int) -> None:
        with self._lock:
            self.layers[layer].bypassed += rows

    def record_invalidation(self) -> None:
        with self._lock:
            self.invalidations += 1

    def seconds_per_row(self, layer: str) -> float:
        with self._lock:
            return self._seconds_per_row(layer)

    def _seconds_per_row(self, layer: str) -> float:
        rows, seconds = self._timing(layer)
        return seconds / rows if rows else 0.0

    def _timing(self, layer: str) -> tuple[int, float]:
        counters = self.layers[layer]
        rows, seconds = self._measured.get(layer, (0, 0.0))
        return rows + counters.computed, seconds + counters.compute_seconds

    def timing(self) -> dict[str, dict[str, float]]:
        """Per layer, every row computed and the seconds it took, this process's and the measurements it started
        from: what a warm cache saves beside its entries, so the process that loads it can estimate what hits save."""
        with self._lock:
            return {
                name: {"rows": rows, "seconds": seconds}
                for name in self.layers
                for rows, seconds in [self._timing(name)]
                if rows
            }

    def seed_timing(self, timing: dict[str, dict[str, float]]) -> None:
        """Start from measurements :meth:`timing` saved (layers this model does not cache are ignored)."""
        with self._lock:
            self._measured = {
                name: (int(t["rows"]), float(t["seconds"])) for name, t in timing.items() if name in self.layers
            }

    def reset(self) -> None:
        """Zero the counters; the time measurements are kept (they describe the model, not the entries)."""
        with self._lock:
            self._measured = {name: self._timing(name) for name in self.layers}
            self.layers = {name: LayerCounters() for name in self.layers}
            self.invalidations = 0
            for counts in [*self.tenants.values(), self._unnamed]:
                counts[:] = [0, 0]

    def report(self, bank_sizes: dict[str, tuple[int, int]]) -> dict:
        """Per-layer counters, per-bank entries and bytes, and totals, as plain Python data."""
        with self._lock:
            layers = {
                name: {
                    **asdict(c),
                    "hit_rate": c.hit_rate,
                    "mean_error": c.mean_error,
                    "observed_error_rate": c.observed_error_rate,
                }
                for name, c in self.layers.items()
            }
        banks = {name: {"entries": n, "bytes": b} for name, (n, b) in bank_sizes.items()}
        lookups = sum(c["lookups"] for c in layers.values())
        hits = sum(c["hits"] for c in layers.values())
        audited = sum(c["audited"] for c in layers.values())
        unacceptable = sum(c["audited_unacceptable"] for c in layers.values())
        total = {
            "lookups": lookups,
            "hits": hits,
            "partial_hits": sum(c["partial_hits"] for c in layers.values()),
            "misses": sum(c["misses"] for c in layers.values()),
            "bypassed": sum(c["bypassed"] for c in layers.values()),
            "hit_rate": hits / lookups if lookups else 0.0,
            "verified": sum(c["verified"] for c in layers.values()),
            "max_error": max((c["max_error"] for c in layers.values()), default=0.0),
            "explored": sum(c["explored"] for c in layers.values()),
            "explored_unacceptable": sum(c["explored_unacceptable"] for c in layers.values()),
            "audited": audited,
            "audited_unacceptable": unacceptable,
            "observed_error_rate": unacceptable / audited if audited else 0.0,
            "seconds_saved": sum(c["seconds_saved"] for c in layers.values()),
            "invalidations": self.invalidations,
            "entries": sum(b["entries"] for b in banks.values()),
            "bytes": sum(b["bytes"] for b in banks.values()),
        }
        return {"layers": layers, "banks": banks, "total": total}


def format_report(report: dict) -> str:
    """The report as a fixed-width table, for logs and the command line."""
    lines = [f"{'layer':<28} {'lookups':>8} {'hits':>8} {'misses':>8} {'hit rate':>9} {'saved s':>9}"]
    for name, c in report["layers"].items():
        lines.append(
            f"{name:<28} {c['lookups']:>8} {c['hits']:>8} {c['misses']:>8} {c['hit_rate']:>9.1%} "
            f"{c['seconds_saved']:>9.3f}"
        )
    t = report["total"]
    lines.append(f"banks: {t['entries']} entries, {t['bytes'] / 2**20:.2f} MiB; overall hit rate {t['hit_rate']:.1%}")
    return "\n".join(lines)


def human_bytes(nbytes: float) -> str:
    """``512`` -> ``"512 B"``, ``3_500_000`` -> ``"3.3 MiB"``: sizes in reports, logs and the command line."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while nbytes >= 1024 and len(units) > 1:
        nbytes /= 1024
        units.pop(0)
    return f"{nbytes:.0f} B" if units[0] == "B" else f"{nbytes:.1f} {units[0]}"
