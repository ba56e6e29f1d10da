"""The attention strategy's gate: where caching cannot gain, layers run the model's own attention (sdpa) with no
bookkeeping, bit for bit; probes notice reusable traffic; the decision rule itself on given measurements."""

import pytest
import torch
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.strategies.attention.gate import CACHED, DEFAULT, MEASURED, Gate


def run(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def gates(model):
    return model.layer_cache.stats()["attention_gate"]


def ticking(model):
    """Give every gate a clock that advances one second per reading: each timed span of the engine then lasts one
    second, whatever the machine is doing, so the default attention measures 1 s per call and a missed cached call
    (lookup, compute, store: three spans) 3 s. What the gate decides follows from the rule, not from the load."""
    seconds = iter(range(10**9))
    for gate in model.layer_cache.strategy.gates.values():
        gate.clock = lambda: float(next(seconds))
    return model


def padded(arch, seed):
    batch = tiny_batch(arch, batch=2, length=12, seed=seed)
    batch["attention_mask"][1, -4:] = 0
    return batch


def calls_until(gate, route: str) -> int:
    """How many calls of 100 tokens the gate takes to route one to ``route`` (that call included)."""
    calls = 1
    while gate.route(100, 1) != route:
        calls += 1
    return calls


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_without_reuse_the_gate_runs_the_models_own_sdpa_with_no_bookkeeping(arch):
    requests = [tiny_batch(arch, batch=2, length=12, seed=s) for s in range(8)] + [padded(arch, 9)]
    plain = tiny_model(arch)
    assert plain.config._attn_implementation == "sdpa"
    expected = [run(plain, batch) for batch in requests]
    model = ticking(hf_layercache.enable(plain, LayerCacheConfig(strategy="attention", attention_gate_interval=1000)))
    try:
        outputs = [run(model, batch) for batch in requests]
        layers = len(model.layer_cache.layers)
        # the first two calls of the bucket: the default, measured; then three learning calls (misses: nothing
        # repeats), after which the measured costs say no, and the layer runs sdpa: every later call is bypassed.
        # Only the first layer looks up in its learning calls after the first: once it searched and found nothing
        # to reuse, the later layers of the same request take that as their answer and only compute and store
        for position, bucket in enumerate(b[16] for b in gates(model).values()):
            assert bucket["state"] == "off", position
            paid = 3 if position == 0 else 1
            assert bucket["cached_calls"] == paid and bucket["inferred"] == 3 - paid and bucket["probes"] == 0
            assert bucket["bypassed"] == 2 * (len(requests) - 3)
            assert bucket["reuse"] == 0.0 and bucket["miss_seconds"] > bucket["default_seconds"] > 0
        stats = model.layer_cache.stats()["total"]
        assert stats["bypassed"] == 2 * (len(requests) - 3) * layers
        assert stats["lookups"] == 2 * (3 + layers - 1) and stats["hits"] == 0
        entries = stats["entries"]
        run(model, requests[0])
        assert model.layer_cache.stats()["total"]["entries"] == entries  # bypassed: nothing looked up or stored
        gated = [0, 1, *range(5, len(requests))]
        for i in gated:  # the requests the gate sent to sdpa: sdpa's own result, bit for bit
            assert torch.equal(outputs[i], expected[i])
        for i in (2, 3, 4):  # the cached ones: eager math, to float rounding
            torch.testing.assert_close(outputs[i], expected[i], rtol=0, atol=1e-5)
    finally:
        hf_layercache.disable(model)
    assert plain.config._attn_implementation == "sdpa"
    assert all(torch.equal(run(plain, b), e) for b, e in zip(requests, expected, strict=True))


def test_a_probe_that_finds_reuse_takes_the_cached_path_again():
    batch = tiny_batch("bert", batch=1, length=12)
    config = LayerCacheConfig(strategy="attention", attention_gate_interval=4)
    model = ticking(hf_layercache.enable(tiny_model("bert"), config))
    try:
        for seed in range(5):  # two default calls, three cached ones: all misses, so the gate turns off
            run(model, tiny_batch("bert", batch=1, length=12, seed=100 + seed))
        assert {b[16]["state"] for b in gates(model).values()} == {"off"}
        hits = model.layer_cache.stats()["total"]["hits"]
        for _ in range(15):  # the same request over and over: reusable traffic
            run(model, batch)
        layers = len(model.layer_cache.layers)
        buckets = [b[16] for b in gates(model).values()]
        assert all(bucket["reuse"] == 1.0 for bucket in buckets)
        # the first layer's 4th call (a probe) stored the request and found no reuse, so its next probe came 8 calls
        # later: the 12th hit it and decided from what that hit cost. The later layers took the first layer's
        # finding as their answer in the 4th call (they only stored the request, not looking it up) and, once it
        # found reuse in the 12th, probed in that same request: they hit too
        assert buckets[0]["probes"] == 2 and buckets[0]["inferred"] == 0
        assert all(bucket["probes"] == 1 and bucket["inferred"] == 2 + 1 for bucket in buckets[1:])
        # a layer whose hit beat the default took the cached path for the 13th to 15th calls, which hit too
        for bucket in buckets:
            assert (bucket["state"] == "on") == (bucket["expected_seconds"] < bucket["default_seconds"])
        on = sum(bucket["state"] == "on" for bucket in buckets)
        assert model.layer_cache.stats()["total"]["hits"] - hits == layers + 3 * on
    finally:
        hf_layercache.disable(model)


def test_clear_forgets_the_gates_and_interval_zero_always_caches():
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="attention"))
    try:
        run(model, tiny_batch("bert", batch=1))
        assert all(buckets for buckets in gates(model).values())
        model.layer_cache.clear()
        assert all(not buckets for buckets in gates(model).values())
    finally:
        hf_layercache.disable(model)
    always = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="attention", attention_gate_interval=0))
    try:
        for _ in range(3):
            run(always, tiny_batch("bert", batch=1))
        stats = always.layer_cache.stats()
        assert stats["total"]["bypassed"] == 0 and stats["total"]["hits"] == 2 * len(always.layer_cache.layers)
        assert all(not buckets for buckets in stats["attention_gate"].values())
    finally:
        hf_layercache.disable(always)


def test_gate_decides_from_measured_cost_and_reuse():
    gate = Gate(interval=4)
    assert gate.bucket_of(12) == 16 and gate.bucket_of(512) == 512 and gate.bucket_of(513) == 1024
    for seconds in (3.0, 1.0):  # first: measure the default, twice (the fastest counts)
        assert gate.route(500, 1) == MEASURED
        gate.record_default(500, rows=1, seconds=seconds)
    for hits in (0, 1, 1):  # learning: a miss (into an empty bank), then two hits at half the default's cost
        assert gate.route(500, 1) == CACHED
        gate.record_cached(500, 1, hits, searched=hits > 0, overhead=0.1, serve=0.4, compute=2.0)
    bucket = gate.buckets[512]
    assert bucket.state == "on" and bucket.reuse == 1.0  # the empty-bank miss says nothing about reuse
    assert [gate.route(500, 1) for _ in range(4)] == [CACHED, CACHED, CACHED, MEASURED]  # on: re-measures the default
    for _ in range(2):  # the traffic stops repeating: misses at 2.1 s against a default of 1 s
        gate.record_cached(500, 1, 0, searched=True, overhead=0.1, serve=0.0, compute=2.0)
    assert bucket.state == "off" and bucket.idle_probes == 0
    # off: the default, timed once per interval, and a probe
    assert [gate.route(500, 1) for _ in range(4)] == [MEASURED, DEFAULT, DEFAULT, CACHED]
    gate.record_cached(500, 1, 1, searched=True, overhead=0.1, serve=2.9, compute=0.0)  # a hit dearer than sdpa
    assert bucket.state == "off" and bucket.probes == 1 and bucket.bypassed == 6 and bucket.reuse == 1.0
    assert bucket.hit_seconds == pytest.approx(0.7 * 0.5 + 0.3 * 3.0)  # averaged with the hits measured before
    assert [gate.route(500, 1) for _ in range(4)] == [MEASURED, DEFAULT, DEFAULT, CACHED]  # no learning phase
    gate.record_cached(500, 1, 1, searched=True, overhead=0.1, serve=0.2, compute=0.0)  # hits got cheaper
    assert bucket.state == "on" and bucket.probes == 2  # the probe itself decided
    assert gate.route(500, 1) == CACHED
    with pytest.raises(ValueError, match="attention_gate_interval"):
        LayerCacheConfig(strategy="attention", attention_gate_interval=-1)


def test_probes_that_find_no_reuse_come_ever_more_rarely():
    gate = Gate(interval=2)
    for _ in range(2):
        gate.route(100, 1)
        gate.record_default(100, rows=1, seconds=1.0)
    for _ in range(3):  # learning: misses at twice the default
        assert gate.route(100, 1) == CACHED
        gate.record_cached(100, 1, 0, searched=True, overhead=0.0, serve=0.0, compute=2.0)
    bucket = gate.buckets[128]
    assert bucket.state == "off"

    waits = []
    for _ in range(5):
        waits.append(calls_until(gate, CACHED))
        gate.record_cached(100, 1, 0, searched=True, overhead=0.0, serve=0.0, compute=2.0)  # no reuse again
    assert waits == [2, 4, 8, 16, 16]  # doubling, up to 8 intervals
    waits = []
    for hits in (1, 0):  # a probe that hits (but costs more than the default): back to one interval
        waits.append(calls_until(gate, CACHED))
        gate.record_cached(100, 1, hits, searched=True, overhead=0.0, serve=2.0, compute=2.0)
    assert waits == [16, 2] and bucket.state == "off" and bucket.idle_probes == 1


def learn(gate, length, hits, serve=0.0):
    """Two measured defaults of 1 s, then three learning calls into a bank with entries, each finding ``hits``."""
    for _ in range(2):
        assert gate.route(length, 1) == MEASURED
        gate.record_default(length, rows=1, seconds=1.0)
    for _ in range(3):
        assert gate.route(length, 1) == CACHED
        gate.record_cached(length, 1, hits, searched=True, overhead=0.0, serve=serve, compute=2.0)


def test_a_new_length_starts_off_where_the_layer_found_no_reuse():
    # natural documents padded to their batch's longest: a batch shorter than half the usual length falls into a
    # bucket of its own, first met in the middle of traffic where nothing repeats. It does not learn (three cached
    # calls): the layer's other buckets already found no reuse, so it starts off and probes as they do
    gate = Gate(interval=4)
    learn(gate, 500, hits=0)
    assert gate.buckets[512].state == "off" and gate.buckets[512].reuse == 0.0
    routes = []
    for _ in range(6):
        routes.append(gate.route(200, 1))
        if routes[-1] == MEASURED:
            gate.record_default(200, rows=1, seconds=1.0)
    assert routes == [MEASURED, MEASURED, MEASURED, DEFAULT, DEFAULT, CACHED]  # the last: a probe, not learning
    bucket = gate.buckets[256]
    assert bucket.state == "off" and bucket.probes == 1 and bucket.cached_calls == 0 and bucket.bypassed == 5


def test_a_new_length_learns_where_the_layer_found_reuse():
    gate = Gate(interval=4)
    learn(gate, 500, hits=1, serve=3.0)  # hits, dearer than the default: off, but the traffic repeats
    assert gate.buckets[512].state == "off" and gate.buckets[512].reuse > 0
    for _ in range(2):
        assert gate.route(200, 1) == MEASURED
        gate.record_default(200, rows=1, seconds=1.0)
    assert gate.route(200, 1) == CACHED and gate.buckets[256].state == "learning"


def test_re_measurements_that_confirm_caching_come_ever_more_rarely():
    # while on, the default is timed once per interval; where hits cost a fraction of it, each such call costs
    # several hits, so re-measurements that keep caching on back off as idle probes do
    gate = Gate(interval=2)
    learn(gate, 100, hits=1, serve=0.1)
    bucket = gate.buckets[128]
    assert bucket.state == "on"

    waits = []
    for _ in range(5):
        waits.append(calls_until(gate, MEASURED))
        gate.record_default(100, rows=1, seconds=1.0)  # the default still costs ten hits: caching stays on
    assert waits == [2, 4, 8, 16, 16] and bucket.confirmed == 5
    for _ in range(3):  # the traffic stops repeating: off, and back to one interval should it turn on again
        gate.record_cached(100, 1, 0, searched=True, overhead=0.0, serve=0.0, compute=2.0)
    assert bucket.state == "off" and bucket.confirmed == 0
