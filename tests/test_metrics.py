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
