"""Metrics for serving: the layer cache's counters as Prometheus metrics, and a one-line log summary.

Both read the public report, ``model.layer_cache.stats()``, when asked, and keep no counters of their own:

* :class:`LayerCacheCollector` is a `prometheus_client` custom collector (``pip install "hf-layercache[metrics]"``),
  the form prometheus_client's authors give for values that live elsewhere: each scrape calls ``stats()`` once per
  model and turns the report into metric families, so nothing is counted twice and nothing has to be updated on the
  request path. Register it with a registry (``prometheus_client.REGISTRY`` by default) and serve it with
  ``start_http_server`` or ``generate_latest``.
* :func:`log_summary` logs one line of totals, for a periodic log or the end of a batch job (no prometheus_client
  needed).

What is exported (every metric has a ``model`` label: the name the model was added under):

===========================================  ======================  ==============================================
metric                                       labels                  from ``stats()``
===========================================  ======================  ==============================================
``hf_layercache_lookups_total``              ``layer``               ``layers[layer]["lookups"]``
``hf_layercache_hits_total``                 ``layer``               ``hits``: rows served from the cache
``hf_layercache_partial_hits_total``         ``layer``               ``partial_hits``: of those, served in part
``hf_layercache_misses_total``               ``layer``               ``misses``
``hf_layercache_bypassed_total``             ``layer``               ``bypassed``: rows run uncached by request
``hf_layercache_verified_error``             ``layer``               summary: ``verified`` (count), ``error_sum``
``hf_layercache_max_error``                  ``layer``               ``max_error`` (gauge)
``hf_layercache_audited_total``              ``layer``               ``audited``: verified hits that were served
``hf_layercache_audited_unacceptable_total`` ``layer``               ``audited_unacceptable``
``hf_layercache_observed_error_rate``        ``layer``               ``observed_error_rate`` (gauge)
``hf_layercache_entries``                    ``bank``                ``banks[bank]["entries"]`` (gauge)
``hf_layercache_bytes``                      ``bank``                ``banks[bank]["bytes"]`` (gauge)
``hf_layercache_invalidations_total``        (``model`` only)        ``total["invalidations"]``
``hf_layercache_shared_hits_total``, ...     (``model`` only)        ``shared``: one counter per shared-tier count
===========================================  ======================  ==============================================

The shared tier (``shared_store``, Redis) exports ``hf_layercache_shared_{hits,misses,refused,skipped,errors,
bytes_read,bytes_written,dropped}_total``, for models that have one.

Per tenant (``namespace`` label): ``hf_layercache_namespace_entries`` (gauge), ``hf_layercache_namespace_hits_total``
and ``hf_layercache_namespace_misses_total`` (summed over layers, for tenants this process served). The report
counts no evictions, so none is exported; a bank's ``entries`` gauge falling while lookups go on shows them. Sums
over layers are PromQL's job (``sum by (model) (rate(hf_layercache_hits_total[5m]))``); the hit rate is hits over
lookups.

Namespaces are chosen by clients, so the ``namespace`` label is bounded (``namespace_labels``): every other label
is bounded by the model (its layers and banks), but one series per tenant would let clients grow every scrape
without limit (3,000 tenants made 9,000 series), which Prometheus pays for in memory per series and which serving
stacks avoid by bounding or opting in per-tenant labels. By default the 20 namespaces with the most lookups (then
the most entries) keep their own label and the rest are summed under ``namespace="#other"``, so a sum over the
label is still the model's total; a list of names instead labels exactly those (stable series for tenants you
know). The top 20 are chosen at each scrape from the cumulative counts, which change order rarely; when a
namespace enters or leaves them, its counts move between its own series and ``#other``, which Prometheus reads as
a counter reset of one of them. ``#other`` cannot be a tenant's name (names starting with ``#`` are refused).
"""

from __future__ import annotations

import heapq
import logging
import threading
import weakref
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from .stats import OTHER_TENANTS, human_bytes

_PREFIX = "hf_layercache"
DEFAULT_NAMESPACE_LABELS = 20
"""Namespaces with a label of their own per model by default: 3 namespace metrics x 21 series, small beside the
per-layer ones, and enough for the tenants that carry most traffic; the rest are ``#other``."""
_LAYER_COUNTERS = (  # (stats key, metric name without the prefix and _total, help)
    ("lookups", "lookups", "Rows that asked this layer's cache for an entry."),
    ("hits", "hits", "Rows served from this layer's cache (the layer did not compute them)."),
    ("partial_hits", "partial_hits", "Of those, rows served in part: the layer computed the tokens they added."),
    ("misses", "misses", "Rows this layer's cache had no entry to serve for."),
    ("bypassed", "bypassed", "Rows that ran uncached because of the request (bypass(), output_attentions, ...)."),
    ("audited", "audited", "Verified approximate hits that would have been served (a sample of served hits)."),
    ("audited_unacceptable", "audited_unacceptable", "Audited hits judged unacceptable by the acceptance criterion."),
)
_SHARED_COUNTERS = (  # (stats()["shared"] key, help)
    ("shared_hits", "Entries a local miss found in the shared store and served."),
    ("shared_misses", "Entries asked of the shared store that it did not have or had in a refused form."),
    ("shared_refused", "Values found in the shared store but refused (unparsable, wrong shapes, NaN/Inf, signature)."),
    ("shared_skipped", "Entries not asked of the shared store because its breaker was open after an error."),
    ("shared_errors", "Errors of the shared store: connection errors, time-outs, refused commands."),
    ("shared_bytes_read", "Bytes of values read from the shared store."),
    ("shared_bytes_written", "Bytes of values written to the shared store."),
    ("shared_dropped", "Computed entries not written to the shared store: its queue was full or it was down."),
    ("shared_oversized", "Values in the shared store longer than the bound: read no further, a miss."),
)


def _prometheus():
    try:
        import prometheus_client.core
    except ImportError:
        raise ImportError(
            "hf_layercache.metrics.LayerCacheCollector needs prometheus_client: pip install 'hf-layercache[metrics]' "
            "(or pip install prometheus-client)"
        ) from None
    return prometheus_client.core


class LayerCacheCollector:
    """A prometheus_client collector of the layer caches of one or more models.

    ``LayerCacheCollector(model)`` or ``LayerCacheCollector({"encoder": model_a, "ranker": model_b})``; more with
    :meth:`add`. Models are held by weak reference: a model that is deleted, or whose cache was disabled, simply
    stops appearing. Register the collector once per registry (``registry.register(collector)``, or
    ``prometheus_client.REGISTRY.register(collector)``); one collector serves every model, since two collectors
    exporting the same metric names cannot share a registry.

    ``namespace_labels`` bounds the ``namespace`` label, whose values clients choose: an int ``n``, the ``n``
    namespaces of each model with the most lookups (then entries) keep their own label at each scrape; a collection
    of names, exactly those do (opt-in). Every other namespace is summed under ``namespace="#other"``, so sums over
    the label stay the model's totals. The bound is the exporter's (a Prometheus budget per scrape target), not the
    cache's: it is an argument here, not a field of ``LayerCacheConfig``.
    """

    def __init__(
        self,
        models: Any | Mapping[str, Any] | None = None,
        name: str = "model",
        *,
        namespace_labels: int | Collection[str] = DEFAULT_NAMESPACE_LABELS,
    ):
        self._core = _prometheus()
        self._namespace_labels = _check_namespace_labels(namespace_labels)
        self._lock = threading.Lock()
        self._models: dict[str, weakref.ref] = {}
        if isinstance(models, Mapping):
            for model_name, model in models.items():
                self.add(model, model_name)
        elif models is not None:
            self.add(models, name)

    def add(self, model: Any, name: str = "model") -> None:
        """Export ``model``'s layer cache under ``model="name"`` (a name already used is replaced)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}.")
        if getattr(model, "layer_cache", None) is None:
            raise ValueError(
                f"{type(model).__name__} has no layer cache; enable one first (hf_layercache.enable or layer_cache=)."
            )
        with self._lock:
            self._models[name] = weakref.ref(model)

    def remove(self, name: str) -> None:
        with self._lock:
            self._models.pop(name, None)

    def _reports(self) -> Iterator[tuple[str, dict[str, Any]]]:
        with self._lock:
            models = list(self._models.items())
        for name, ref in models:
            controller = getattr(ref(), "layer_cache", None)
            if controller is not None:
                yield name, controller.stats()

    def describe(self):
        """The metric families without samples: the registry learns the names without a scrape."""
        return list(self._families().values())

    def collect(self):
        """One ``stats()`` per model, as metric families (called by the registry on every scrape)."""
        families = self._families()
        for model, report in self._reports():
            for layer, c in report["layers"].items():
                labels = [model, layer]
                for key, _name, _help in _LAYER_COUNTERS:
                    families[key].add_metric(labels, c[key])
                families["verified_error"].add_metric(labels, count_value=c["verified"], sum_value=c["error_sum"])
                families["max_error"].add_metric(labels, c["max_error"])
                families["observed_error_rate"].add_metric(labels, c["observed_error_rate"])
            for bank, b in report["banks"].items():
                families["entries"].add_metric([model, bank], b["entries"])
                families["bytes"].add_metric([model, bank], b["bytes"])
            for namespace, n in fold_namespaces(report.get("namespaces", {}), self._namespace_labels).items():
                families["namespace_entries"].add_metric([model, namespace], n["entries"])
                if "hits" in n:
                    families["namespace_hits"].add_metric([model, namespace], n["hits"])
                    families["namespace_misses"].add_metric([model, namespace], n["misses"])
            families["invalidations"].add_metric([model], report["total"]["invalidations"])
            for key, value in report.get("shared", {}).items():
                if key in families:
                    families[key].add_metric([model], value)
        return list(families.values())

    def _families(self) -> dict[str, Any]:
        core = self._core
        layer, bank = ["model", "layer"], ["model", "bank"]
        families: dict[str, Any] = {
            key: core.CounterMetricFamily(f"{_PREFIX}_{name}", help_, labels=layer)
            for key, name, help_ in _LAYER_COUNTERS
        }
        families["verified_error"] = core.SummaryMetricFamily(
            f"{_PREFIX}_verified_error",
            "Relative error of verified approximate hits: _count hits checked by computing the layer, _sum their "
            "errors (mean error = rate(_sum) / rate(_count)).",
            labels=layer,
        )
        families["max_error"] = core.GaugeMetricFamily(
            f"{_PREFIX}_max_error", "Largest relative error a verified hit of this layer had.", labels=layer
        )
        families["observed_error_rate"] = core.GaugeMetricFamily(
            f"{_PREFIX}_observed_error_rate",
            "Share of audited hits that were unacceptable: the estimate of how often a served hit is.",
            labels=layer,
        )
        families["entries"] = core.GaugeMetricFamily(f"{_PREFIX}_entries", "Entries the bank holds.", labels=bank)
        families["bytes"] = core.GaugeMetricFamily(
            f"{_PREFIX}_bytes", "Bytes the bank accounts (values, keys, index): what max_memory limits.", labels=bank
        )
        families["namespace_entries"] = core.GaugeMetricFamily(
            f"{_PREFIX}_namespace_entries",
            "Entries a tenant holds across the model's banks ('#<tag>' for tenants this process has not served).",
            labels=["model", "namespace"],
        )
        for kind in ("hits", "misses"):
            families[f"namespace_{kind}"] = core.CounterMetricFamily(
                f"{_PREFIX}_namespace_{kind}",
                f"Lookups of a tenant's requests that were {kind}, summed over layers (tenants this process served).",
                labels=["model", "namespace"],
            )
        families["invalidations"] = core.CounterMetricFamily(
            f"{_PREFIX}_invalidations",
            "Times every entry was dropped because the weights changed under the cache.",
            labels=["model"],
        )
        for key, help_ in _SHARED_COUNTERS:
            families[key] = core.CounterMetricFamily(f"{_PREFIX}_{key}", help_, labels=["model"])
        return families


def _check_namespace_labels(value: Any) -> int | frozenset[str]:
    """``namespace_labels`` as :func:`fold_namespaces` takes it; ``ValueError`` naming it unless it is a count or a
    collection of names (a string is refused: it would be a collection of its characters)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    names = isinstance(value, Collection) and not isinstance(value, str | bytes | Mapping)
    if names and all(isinstance(name, str) and name for name in value):
        return frozenset(value)
    raise ValueError(
        f"namespace_labels must be a non-negative int (how many namespaces keep a label) or a collection of namespace "
        f"names, got {value!r}."
    )


def fold_namespaces(
    namespaces: Mapping[str, Mapping[str, int]], labels: int | frozenset[str]
) -> dict[str, dict[str, int]]:
    """``stats()["namespaces"]`` with at most ``labels`` names of its own (an int: those with the most lookups, then
    entries, then by name, so a scrape is deterministic; a set: those names) and the rest summed under
    :data:`~hf_layercache.stats.OTHER_TENANTS` (``hits`` and ``misses`` there when any of them has them)."""
    names = [name for name in namespaces if name != OTHER_TENANTS]
    if isinstance(labels, int):

        def rank(name: str) -> tuple[int, int, str]:
            n = namespaces[name]
            return -(n.get("hits", 0) + n.get("misses", 0)), -n["entries"], name

        own = set(heapq.nsmallest(labels, names, key=rank))
    else:
        own = labels.intersection(names)
    folded: dict[str, dict[str, int]] = {name: dict(namespaces[name]) for name in names if name in own}
    for name, n in namespaces.items():
        if name not in own:
            other = folded.setdefault(OTHER_TENANTS, {"entries": 0})
            for key, value in n.items():
                other[key] = other.get(key, 0) + value
    return folded


def summary_line(model: Any, name: str | None = None) -> str:
    """One line of ``model``'s cache totals: lookups, hits and hit rate, misses, bypassed rows, entries and bytes,
    and, once approximate hits were verified, their largest error and the audited error rate."""
    report = model.layer_cache.stats()
    t = report["total"]
    line = (
        f"layer cache{f' {name}' if name else ''}: {t['lookups']} lookups, {t['hits']} hits ({t['hit_rate']:.1%}), "
        f"{t['misses']} misses, {t['bypassed']} bypassed; {t['entries']} entries, {human_bytes(t['bytes'])} "
        f"in {len(report['banks'])} bank{'s' if len(report['banks']) != 1 else ''}"
    )
    if t["verified"]:
        line += (
            f"; {t['verified']} hits verified, max error {t['max_error']:.3g}, observed error rate "
            f"{t['observed_error_rate']:.1%} of {t['audited']} audited"
        )
    return line


def log_summary(
    model: Any, logger: logging.Logger | None = None, level: int = logging.INFO, name: str | None = None
) -> str:
    """Log :func:`summary_line` of ``model`` on ``logger`` (default: the ``hf_layercache`` logger) at ``level``;
    return the line."""
    line = summary_line(model, name)
    (logger or logging.getLogger("hf_layercache")).log(level, "%s", line)
    return line


__all__ = ["LayerCacheCollector", "fold_namespaces", "log_summary", "summary_line"]
