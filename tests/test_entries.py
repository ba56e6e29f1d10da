"""The shared pieces under every strategy: typed entries and their checks, the K/V codec, the bank's tenant field, and
the one lookup event that feeds both the policy and the stats."""

import pytest
import torch
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.bank import CacheBank
from hf_layercache.bank_format import BankState
from hf_layercache.entries import TensorEntry
from hf_layercache.kv import KVWrite, check_writes, decode_writes, encode_writes
from hf_layercache.policies.lru import LRUPolicy
from hf_layercache.strategies.attention.entry import AttentionEntry
from hf_layercache.strategies.exact.entry import ExactEntry
from hf_layercache.strategies.prefix.block import BlockShape, PrefixBlock
from hf_layercache.strategies.semantic.entries import SemanticEntry


def writes(n: int = 2) -> list[KVWrite]:
    return [KVWrite("self", i, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) for i in range(n)]


# --- the K/V codec --------------------------------------------------------------------------------------------------
def test_codec_round_trips_writes_in_call_order_under_its_prefix():
    original = writes(3)
    stored = {**encode_writes(original, "kv.1"), **encode_writes(writes(1), "kv.0"), "hidden": torch.zeros(1)}
    decoded = decode_writes(stored, "kv.1")
    assert [(w.tag, w.layer_idx) for w in decoded] == [(w.tag, w.layer_idx) for w in original]
    pairs = zip(decoded, original, strict=True)
    assert all(torch.equal(a.key, b.key) and torch.equal(a.value, b.value) for a, b in pairs)
    check_writes(stored, "kv.1")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v.pop("kv.0.self.0.value"), "no 'kv.0.self.0.value'"),
        (lambda v: v.update({"kv.0.self.0.key": torch.zeros(2, 2, 5, 4)}), "one row"),
        (lambda v: v.update({"kv.0.self.0.value": torch.zeros(1, 2, 6, 4)}), "different heads or positions"),
        (lambda v: v.update({"kv.x": torch.zeros(1)}), "not a stored write"),
    ],
)
def test_codec_refuses_writes_it_could_not_replay(change, message):
    stored = encode_writes(writes(1))
    change(stored)
    with pytest.raises(ValueError, match=message):
        check_writes(stored)


# --- typed entries --------------------------------------------------------------------------------------------------
def entries():
    return {
        "exact": (ExactEntry(torch.randn(5, 8), (5, 0, 5), True, {0: writes(1), 2: writes(2)}), {"hidden_size": 8}),
        "semantic": (
            SemanticEntry("delta", torch.randn(5, 8), torch.arange(5), bytes(range(32)), True, writes(1)),
            {"hidden_size": 8},
        ),
        "attention": (
            AttentionEntry(torch.randn(2, 5), torch.ones(5, 5, dtype=torch.bool), *torch.randn(4, 2, 5, 4)),
            {"heads": 2},
        ),
        "prefix": (
            PrefixBlock(
                torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8), torch.randn(4, 16), torch.arange(4), b"p" * 32
            ),
            {"shape": BlockShape(3, 2, 8, 16, block_size=4)},
        ),
    }


@pytest.mark.parametrize("kind", ["exact", "semantic", "attention", "prefix"])
def test_typed_entries_round_trip_and_refuse_what_they_could_not_serve(kind):
    entry, expected = entries()[kind]
    values = entry.to_tensors()
    type(entry).validate(values, **expected)
    again = type(entry).from_tensors(values).to_tensors()
    assert values.keys() == again.keys() and all(torch.equal(values[k], again[k]) for k in values)
    with pytest.raises(ValueError, match="unexpected field"):
        type(entry).validate({**values, "surprise": torch.zeros(1)}, **expected)
    first = next(iter(values))
    with pytest.raises(ValueError, match=repr(first)):
        type(entry).validate({k: v for k, v in values.items() if k != first}, **expected)


# --- the bank: tenants and state ------------------------------------------------------------------------------------
def test_the_bank_serves_an_entry_to_its_own_tenant_only_and_keeps_tenants_on_disk():
    bank = CacheBank("b", LRUPolicy())
    mine = bank.put(TensorEntry({"v": torch.zeros(2)}), digest=b"a" * 32, namespace=7)
    assert bank.get(mine, namespace=7) is not None and bank.get(mine, namespace=8) is None
    restored = CacheBank("b", LRUPolicy())
    restored.load_state_dict(bank.state_dict())
    assert restored.get(mine, namespace=7) is not None and restored.get(mine, namespace=8) is None
    parsed = BankState.parse(bank.state_dict())
    assert parsed.namespaces == {mine: 7} and parsed.digests == {mine: b"a" * 32}


def test_update_changes_a_stored_entry_and_reports_a_gone_one():
    bank = CacheBank("b", LRUPolicy())
    entry_id = bank.put(TensorEntry({"v": torch.zeros(2)}))
    assert bank.update(entry_id, lambda values: values["v"].fill_(3.0))
    assert torch.equal(bank.get(entry_id)["v"], torch.full((2,), 3.0))
    bank.remove(entry_id)
    assert not bank.update(entry_id, lambda values: values["v"].fill_(4.0))


# --- one lookup event -----------------------------------------------------------------------------------------------
class CountingPolicy(LRUPolicy):
    """LRU that counts what the bank tells it, to compare with the stats."""

    def __init__(self):
        super().__init__()
        self.hits = self.misses = 0

    def on_hit(self, entry_id, similarity):
        super().on_hit(entry_id, similarity)
        self.hits += 1

    def on_miss(self):
        self.misses += 1


@pytest.fixture
def counting_policy():
    hf_layercache.register_policy("counting-test", CountingPolicy)
    yield "counting-test"


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("exact", {}), ("semantic", {"threshold": 0.0, "reuse": "residual", "verify_fraction": 0.2})],
)
def test_policy_and_stats_hear_the_same_hits(counting_policy, strategy, extra):
    """A row the strategy found but did not serve (a KV cache takes a batch whole; a verified hit is computed) is a
    miss for both readers."""
    model = tiny_model("llama")
    hf_layercache.enable(model, LayerCacheConfig(strategy=strategy, policy=counting_policy, **extra))
    first, other = tiny_batch("llama", batch=2, seed=1), tiny_batch("llama", batch=2, seed=2)
    mixed = {k: torch.stack([first[k][0], other[k][0]]) for k in first}
    with torch.no_grad():
        for batch in (first, mixed, *[first] * 6):
            model(**batch, use_cache=True)
    stats = model.layer_cache.stats()["layers"]
    for name in model.layer_cache.strategy.saved_banks():  # exact's request bank serves none of these calls
        bank = model.layer_cache.banks[name]
        layers = [layer for layer in stats if layer == name or layer.startswith(name + ".")]
        assert bank.policy.hits == stats[layers[0]]["hits"] > 0
        assert bank.policy.misses == stats[layers[0]]["misses"] > 0


def test_stats_and_metrics_count_entries_per_tenant(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from hf_layercache.metrics import LayerCacheCollector

    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(namespace="tenant-a"))
    with torch.no_grad():
        model(**tiny_batch("bert", batch=3))
        with model.layer_cache.namespace("tenant-b"):
            model(**tiny_batch("bert", batch=2, seed=4))
    stack = model.layer_cache.banks["encoder.layer"]
    per_tenant = model.layer_cache.stats()["namespaces"]
    assert set(per_tenant) == {"tenant-a", "tenant-b"}
    assert per_tenant["tenant-b"]["entries"] * 3 == per_tenant["tenant-a"]["entries"] * 2  # 2 rows against 3
    assert sum(t["entries"] for t in per_tenant.values()) == model.layer_cache.stats()["total"]["entries"]
    assert len(stack) == 5
    model.layer_cache.save(tmp_path)
    warm = hf_layercache.enable(tiny_model("bert"))  # a process that has served neither tenant
    warm.layer_cache.load(tmp_path)
    assert sorted(t["entries"] for t in warm.layer_cache.stats()["namespaces"].values()) == [2, 3]
    assert all(name.startswith("#") for name in warm.layer_cache.stats()["namespaces"])

    registry = CollectorRegistry()
    registry.register(LayerCacheCollector(model, name="m"))
    text = generate_latest(registry).decode()
    assert 'hf_layercache_namespace_entries{model="m",namespace="tenant-b"}' in text


@pytest.mark.parametrize("backend", ["exact", "faiss", "annoy"])
def test_other_tenants_entries_never_crowd_out_a_tenants_own_nearest_entry(backend):
    if backend not in hf_layercache.available_backends():
        pytest.skip(f"{backend} is not installed")
    bank = CacheBank("b", LRUPolicy(), backend=hf_layercache.get_backend(backend)(8))
    query = torch.nn.functional.normalize(torch.ones(8), dim=0)
    g = torch.Generator().manual_seed(0)
    own = bank.put(TensorEntry({"v": torch.zeros(1)}), key=query + 0.3 * torch.randn(8, generator=g), namespace=1)
    for _ in range(40):  # another tenant's entries, every one nearer the query than the tenant's own
        bank.put(TensorEntry({"v": torch.zeros(1)}), key=query + 0.01 * torch.randn(8, generator=g), namespace=2)
    _, everyone = bank.search(query[None], k=4)
    assert own not in everyone[0].tolist()  # what a search across tenants returns: the other tenant's
    scores, ids = bank.search(query[None], k=4, namespace=1)
    assert ids[0].tolist() == [own, -1, -1, -1] and scores[0, 0] > 0.5
    assert bank.namespace_counts() == {1: 1, 2: 40}


def test_stats_count_hits_and_misses_per_tenant():
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(namespace="tenant-a"))
    batch = tiny_batch("bert", batch=3)
    with torch.no_grad():
        model(**batch)
        model(**batch)  # tenant-a's repeat: served
        with model.layer_cache.namespace("tenant-b"):
            model(**batch)  # the same rows, another tenant: computed
    per_tenant, total = model.layer_cache.stats()["namespaces"], model.layer_cache.stats()["total"]
    layers = len(model.layer_cache.layers)
    assert per_tenant["tenant-a"]["hits"] == 3 * layers and per_tenant["tenant-b"]["hits"] == 0
    assert per_tenant["tenant-b"]["misses"] == per_tenant["tenant-a"]["misses"] == 3 * layers
    assert sum(t["hits"] for t in per_tenant.values()) == total["hits"]
    assert sum(t["misses"] for t in per_tenant.values()) == total["misses"]
    from prometheus_client import CollectorRegistry

    from hf_layercache.metrics import LayerCacheCollector

    registry = CollectorRegistry()
    registry.register(LayerCacheCollector(model, name="m"))
    labels = {"model": "m", "namespace": "tenant-a"}
    assert registry.get_sample_value("hf_layercache_namespace_hits_total", labels) == 3 * layers
    model.layer_cache.clear()
    assert model.layer_cache.stats()["namespaces"] == {}
