"""The attention strategy within one batch and one request: identical rows computed once, and the gates of later
layers answered by what an earlier layer of the same request found (no timing: decisions come from given costs)."""

import pytest
import torch
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.strategies.attention.gate import (
    CACHED,
    DEFAULT,
    MEASURED,
    NO_REUSE,
    PROBE_HIT,
    REUSED,
    STORE,
    Gate,
    combine,
)


def run(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def with_duplicates(arch):
    """Four rows: 0 and 2 the same text, 1 and 3 the same padded text."""
    batch = tiny_batch(arch, batch=2, length=10, seed=3)
    return {name: torch.cat([value, value]) for name, value in batch.items()}


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_identical_rows_of_a_batch_are_looked_up_computed_and_stored_once(arch):
    batch = with_duplicates(arch)
    expected = run(tiny_model(arch), batch)
    config = LayerCacheConfig(strategy="attention", attention_gate_interval=0)
    model = hf_layercache.enable(tiny_model(arch), config)
    try:
        output = run(model, batch)
        stats = model.layer_cache.stats()
        for name, layer in stats["layers"].items():  # two distinct rows of four: two computed, two looked up
            assert layer["computed"] == 2 and layer["lookups"] == 2, name
        layers = len(model.layer_cache.layers)
        assert stats["total"]["entries"] == 2 * layers
        assert model.layer_cache.strategy.reuse["duplicates"] == 2 * layers
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
        assert torch.equal(output[0], output[2]) and torch.equal(output[1], output[3])
        output = run(model, batch)  # again: two hits per layer serve all four rows
        stats = model.layer_cache.stats()["total"]
        assert stats["hits"] == 2 * layers and stats["entries"] == 2 * layers
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    finally:
        hf_layercache.disable(model)


def test_rows_with_equal_lookup_keys_but_other_states_are_not_merged():
    batch = tiny_batch("bert", batch=2, length=10, seed=4)
    batch = {name: torch.cat([value[:1], value[:1]]) for name, value in batch.items()}
    batch["attention_mask"][1, -1] = 0  # same tokens, one key masked: other masks, other outputs
    expected = run(tiny_model("bert"), batch)
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="attention", attention_gate_interval=0))
    try:
        output = run(model, batch)
        assert all(layer["computed"] == 2 for layer in model.layer_cache.stats()["layers"].values())
        assert model.layer_cache.strategy.reuse["duplicates"] == 0
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    finally:
        hf_layercache.disable(model)


def learned_off(gate, length=100):
    """Two measured defaults at 1 s, then learning calls at twice that: the bucket ends off."""
    for _ in range(2):
        assert gate.route(length, 1) == MEASURED
        gate.record_default(length, rows=1, seconds=1.0)
    for _ in range(3):
        assert gate.route(length, 1) == CACHED
        gate.record_cached(length, 1, 0, searched=True, overhead=0.0, serve=0.0, compute=2.0)
    return gate.buckets[gate.bucket_of(length)]


def test_an_earlier_layer_that_found_no_reuse_answers_learning_calls_and_probes():
    gate = Gate(interval=2)
    for _ in range(2):
        gate.route(100, 1)
        gate.record_default(100, rows=1, seconds=1.0)
    assert gate.route(100, 1, NO_REUSE) == CACHED  # no miss measured yet: this layer must pay once
    gate.record_cached(100, 1, 0, searched=False, overhead=0.0, serve=0.0, compute=2.0)
    bucket = gate.buckets[128]
    # the next learning calls: only stored (STORE), counted as calls that found nothing, and the bucket decides
    assert [gate.route(100, 1, NO_REUSE) for _ in range(2)] == [STORE, STORE]
    assert bucket.state == "off" and bucket.inferred == 2 and bucket.reuse == 0.0 and bucket.cached_calls == 1
    # off: a due probe is answered the same way, and backs off as a probe that found nothing does
    assert [gate.route(100, 1, NO_REUSE) for _ in range(2)] == [MEASURED, STORE]
    assert bucket.idle_probes == 1 and bucket.probes == 0 and bucket.inferred == 3
    # with no word from earlier layers, probes come on their own schedule (4 calls now)
    assert [gate.route(100, 1) for _ in range(4)] == [MEASURED, DEFAULT, DEFAULT, CACHED]


def test_a_probe_that_found_reuse_in_an_earlier_layer_makes_the_later_ones_probe_at_once():
    gate = Gate(interval=16)
    assert learned_off(gate).state == "off"
    assert gate.route(100, 1) == MEASURED
    assert gate.route(100, 1, REUSED) == DEFAULT  # an earlier layer that was on reused: nothing to learn here
    assert gate.route(100, 1, PROBE_HIT) == CACHED  # an earlier layer's probe hit: traffic turned reusable
    found = gate.record_cached(100, 1, 1, searched=True, overhead=0.0, serve=0.5, compute=0.0)
    assert found == PROBE_HIT and gate.buckets[128].state == "on" and gate.buckets[128].probes == 1
    assert gate.record_cached(100, 1, 1, searched=True, overhead=0.0, serve=0.5, compute=0.0) == REUSED
    assert gate.record_cached(100, 1, 0, searched=True, overhead=0.0, serve=0.0, compute=2.0) == NO_REUSE
    assert gate.record_cached(100, 1, 0, searched=False, overhead=0.0, serve=0.0, compute=2.0) is None


def test_any_reuse_in_the_request_outweighs_no_reuse():
    assert combine(None, NO_REUSE) == NO_REUSE
    assert combine(NO_REUSE, REUSED) == REUSED and combine(REUSED, NO_REUSE) == REUSED
    assert combine(PROBE_HIT, NO_REUSE) == PROBE_HIT and combine(REUSED, PROBE_HIT) == PROBE_HIT
    assert combine(NO_REUSE, None) == NO_REUSE


def test_a_row_padded_to_max_length_is_not_half_reusable_for_its_padding():
    """Against an unrelated row with as much padding, the share of recomputed positions counts live ones only."""
    length, live = 64, 12
    batches = [tiny_batch("bert", batch=1, length=length, seed=s) for s in (20, 21)]
    for batch in batches:
        batch["attention_mask"][:, live:] = 0
        batch["input_ids"][:, live:] = 0
    config = LayerCacheConfig(strategy="attention", attention_gate_interval=0, threshold=-1.0)
    model = hf_layercache.enable(tiny_model("bert"), config)
    try:
        run(model, batches[0])
        expected = run(tiny_model("bert"), batches[1])
        torch.testing.assert_close(run(model, batches[1]), expected, rtol=0, atol=1e-5)
        assert model.layer_cache.stats()["total"]["hits"] == 0
    finally:
        hf_layercache.disable(model)
