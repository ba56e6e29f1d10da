"""hf_layercache.metrics: the Prometheus collector (real prometheus_client) and the one-line log summary, checked
against the report they are built from, model.layer_cache.stats()."""

import gc
import logging
import urllib.request

import pytest
import torch
from tiny import tiny_batch, tiny_model

import hf_layercache

prometheus_client = pytest.importorskip("prometheus_client", reason="pip install 'hf-layercache[metrics]'")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from hf_layercache.metrics import LayerCacheCollector, log_summary, summary_line  # noqa: E402


def _served(config: dict, seed: int = 0):
    """A tiny BERT with a cache that saw a batch twice, and once under bypass()."""
    model = hf_layercache.enable(tiny_model("bert", seed=seed), config)
    batch = tiny_batch("bert")
    with torch.no_grad():
        model(**batch)
        model(**batch)
        with model.layer_cache.bypass():
            model(**batch)
    return model


def _scrape(registry) -> dict[tuple[str, tuple], float]:
    """Every sample of the registry's text exposition as {(sample name, sorted labels): value}."""
    text = prometheus_client.generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize(
    "config",
    [
        {"strategy": "exact"},
        {"strategy": "semantic", "threshold": 0.5, "verify_fraction": 1.0},  # every hit verified and audited
    ],
    ids=["exact", "semantic"],
)
def test_every_metric_is_the_stats_report_value_under_its_labels(config):
    model = _served(config)
    registry = prometheus_client.CollectorRegistry()
    registry.register(LayerCacheCollector(model, "tiny"))
    samples = _scrape(registry)
    report = model.layer_cache.stats()
    counters = {
        "lookups": "lookups",
        "hits": "hits",
        "partial_hits": "partial_hits",
        "misses": "misses",
        "bypassed": "bypassed",
        "audited": "audited",
        "audited_unacceptable": "audited_unacceptable",
    }
    assert report["total"]["lookups"] > 0 and report["total"]["bypassed"] > 0
    for layer, c in report["layers"].items():
        labels = (("layer", layer), ("model", "tiny"))
        for key, name in counters.items():
            assert samples[(f"hf_layercache_{name}_total", labels)] == c[key], (layer, key)
        assert samples[("hf_layercache_verified_error_count", labels)] == c["verified"]
        assert samples[("hf_layercache_verified_error_sum", labels)] == pytest.approx(c["error_sum"])
        assert samples[("hf_layercache_max_error", labels)] == pytest.approx(c["max_error"])
        assert samples[("hf_layercache_observed_error_rate", labels)] == pytest.approx(c["observed_error_rate"])
    for bank, b in report["banks"].items():
        assert samples[("hf_layercache_entries", (("bank", bank), ("model", "tiny")))] == b["entries"]
        assert samples[("hf_layercache_bytes", (("bank", bank), ("model", "tiny")))] == b["bytes"]
    assert report["total"]["entries"] > 0 and report["total"]["bytes"] > 0
    assert samples[("hf_layercache_invalidations_total", (("model", "tiny"),))] == report["total"]["invalidations"]
    if config["strategy"] == "semantic":
        assert report["total"]["verified"] > 0  # the error metrics carried something


def test_each_scrape_reads_the_current_report():
    model = _served({"strategy": "exact"})
    registry = prometheus_client.CollectorRegistry()
    registry.register(LayerCacheCollector(model, "tiny"))
    hits = ("hf_layercache_hits_total", (("layer", "encoder.layer.2"), ("model", "tiny")))
    before = _scrape(registry)[hits]
    with torch.no_grad():
        model(**tiny_batch("bert"))
    assert _scrape(registry)[hits] == before + 3
    model.layer_cache.clear()
    assert _scrape(registry)[hits] == 0


def test_one_collector_serves_several_models_and_forgets_those_gone_or_uncached():
    a, b = _served({"strategy": "exact"}), _served({"strategy": "exact"}, seed=1)
    collector = LayerCacheCollector({"a": a, "b": b})
    registry = prometheus_client.CollectorRegistry()
    registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):  # why several models share one collector
        registry.register(LayerCacheCollector(a, "again"))
    models = lambda: {dict(labels)["model"] for _, labels in _scrape(registry)}  # noqa: E731
    assert models() == {"a", "b"}
    hf_layercache.disable(b)
    assert models() == {"a"}
    del a
    gc.collect()
    assert models() == set()  # held by weak reference: the collector keeps no model alive
    with pytest.raises(ValueError, match="has no layer cache"):
        collector.add(tiny_model("bert"), "uncached")


def test_metrics_are_served_over_http():
    model = _served({"strategy": "exact"})
    registry = prometheus_client.CollectorRegistry()
    registry.register(LayerCacheCollector(model, "tiny"))
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=30) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        thread.join(timeout=30)
    assert 'hf_layercache_hits_total{layer="encoder.layer.0",model="tiny"} 3.0' in body
    assert 'hf_layercache_entries{bank="encoder.layer",model="tiny"} 3.0' in body


def test_log_summary_is_one_line_of_totals(caplog):
    model = _served({"strategy": "exact"})
    total = model.layer_cache.stats()["total"]
    with caplog.at_level(logging.INFO, logger="hf_layercache"):
        line = log_summary(model, name="tiny")
    assert [record.getMessage() for record in caplog.records] == [line]
    assert "\n" not in line and line == summary_line(model, "tiny")
    assert line.startswith(
        f"layer cache tiny: {total['lookups']} lookups, {total['hits']} hits ({total['hit_rate']:.1%}), "
        f"{total['misses']} misses, {total['bypassed']} bypassed; {total['entries']} entries"
    )
    assert "verified" not in line  # exact hits are never verified: nothing to say about errors

    semantic = _served({"strategy": "semantic", "threshold": 0.5, "verify_fraction": 1.0})
    logger = logging.getLogger("my.service")
    with caplog.at_level(logging.WARNING, logger="my.service"):
        line = log_summary(semantic, logger=logger, level=logging.WARNING)
    assert caplog.records[-1].name == "my.service" and caplog.records[-1].levelno == logging.WARNING
    assert f"{semantic.layer_cache.stats()['total']['verified']} hits verified, max error" in line


def _tenant_traffic(model, traffic: dict[str, tuple[int, int]]) -> None:
    """Lookups of many tenants, recorded as requests record them (``controller.record_lookup`` calls these two per
    request; 3,000 real requests would take minutes here)."""
    counters = model.layer_cache.counters
    layers = [layer.name for layer in model.layer_cache.layers]
    for tenant, (hits, misses) in traffic.items():
        counters.remember_tenant(tenant)
        counters.record_lookup(layers, hits, misses, tenant)


def _namespace_samples(registry, metric: str) -> dict[str, float]:
    return {dict(labels)["namespace"]: value for (name, labels), value in _scrape(registry).items() if name == metric}


def test_3000_namespaces_export_a_bounded_label_set_with_the_totals_kept():
    """#30 item 9: 3,000 client-chosen namespaces gave 9,000 namespace series per scrape. The busiest keep their own
    label, the rest are summed under '#other', and a sum over the label is still the model's total."""
    model = _served({"strategy": "exact"})  # "default": real requests, real entries
    heavy = [f"heavy-{i}" for i in range(5)]
    with torch.no_grad():
        for i, tenant in enumerate(heavy):
            with model.layer_cache.namespace(tenant):
                model(**tiny_batch("bert", batch=1, seed=10 + i))
    _tenant_traffic(model, {tenant: (50 + i, 40) for i, tenant in enumerate(heavy)})
    _tenant_traffic(model, {f"client-{i:04d}": (i % 2, 1) for i in range(3000)})
    registry = prometheus_client.CollectorRegistry()
    registry.register(LayerCacheCollector(model, "m"))
    report = model.layer_cache.stats()
    assert len(report["namespaces"]) > 3000
    for metric, key, total in [
        ("hf_layercache_namespace_hits_total", "hits", report["total"]["hits"]),
        ("hf_layercache_namespace_misses_total", "misses", report["total"]["misses"]),
        ("hf_layercache_namespace_entries", "entries", report["total"]["entries"]),
    ]:
        samples = _namespace_samples(registry, metric)
        assert len(samples) <= 20 + 1 and "#other" in samples, (metric, len(samples))
        assert sum(samples.values()) == total, metric  # nothing lost, nothing counted twice
        for tenant in [*heavy, "default"]:  # the busiest tenants keep their own series, with their own values
            assert samples[tenant] == report["namespaces"][tenant][key], (metric, tenant)
    series = [labels for name, labels in _scrape(registry) if dict(labels).get("namespace") is not None]
    assert len(series) <= 3 * 21


def test_namespace_labels_opt_in_names_or_a_count_and_bad_values_are_refused():
    model = _served({"strategy": "exact"})
    _tenant_traffic(model, {"gold": (1, 1), "silver": (9, 9), "bronze": (5, 5)})
    registry = prometheus_client.CollectorRegistry()
    registry.register(LayerCacheCollector(model, "m", namespace_labels=["gold", "absent"]))
    hits = _namespace_samples(registry, "hf_layercache_namespace_hits_total")
    report = model.layer_cache.stats()["namespaces"]
    assert set(hits) == {"gold", "#other"}  # exactly the names asked for, however little traffic they have
    assert hits["#other"] == sum(n["hits"] for name, n in report.items() if name != "gold")
    registry = prometheus_client.CollectorRegistry()
    registry.register(LayerCacheCollector(model, "m", namespace_labels=0))
    assert set(_namespace_samples(registry, "hf_layercache_namespace_entries")) == {"#other"}
    for bad in (-1, "gold", True, [""], 1.5):
        with pytest.raises(ValueError, match="namespace_labels must be a non-negative int"):
            LayerCacheCollector(model, "m", namespace_labels=bad)


def test_tenants_beyond_the_remembered_names_are_counted_as_other():
    """stats() remembers at most MAX_TENANT_NAMES tenant names; the lookups of the rest were dropped from the
    per-tenant counts, so they no longer added up to the totals."""
    from hf_layercache.stats import MAX_TENANT_NAMES, CacheStats

    stats = CacheStats(["layer.0", "layer.1"])
    for i in range(MAX_TENANT_NAMES + 5):
        stats.remember_tenant(f"t{i}")
        stats.record_lookup(["layer.0", "layer.1"], 1, 2, f"t{i}")
    per_tenant = stats.tenant_report({}, lambda name: 0)
    total = stats.report({})["total"]
    assert len(per_tenant) == MAX_TENANT_NAMES  # "default" and 9,999 others by name, then "#other"
    assert per_tenant["#other"] == {"entries": 0, "hits": 2 * 6, "misses": 4 * 6}
    assert sum(n["hits"] for n in per_tenant.values()) == total["hits"] == 2 * (MAX_TENANT_NAMES + 5)
    assert sum(n["misses"] for n in per_tenant.values()) == total["misses"]
    stats.reset()
    assert stats.tenant_report({}, lambda name: 0) == {}
