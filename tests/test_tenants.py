"""Tenants apart (#30 item 10): a tenant's searches, results and entries do not depend on what other tenants stored.

Searches are counted by real backends (subclasses of the registered ones, registered under a name of their own), so
these tests count operations, never seconds.
"""

from __future__ import annotations

import pytest
import torch
from tiny import VOCAB, tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.bank import CacheBank
from hf_layercache.entries import TensorEntry
from hf_layercache.policies.lru import LRUPolicy
from hf_layercache.registry import BACKENDS

SEARCHES = {"count": 0}
"""Index searches made by every counting backend since the last reset."""
FAST = ["exact", "faiss", "annoy"]


def counting_backend(name: str) -> str:
    """Register a subclass of backend ``name`` that counts its searches; returns the name it is registered under."""
    base = hf_layercache.get_backend(name)

    def search(self, queries, k=1):
        SEARCHES["count"] += 1
        return base.search(self, queries, k)

    counted = f"counting-{name}"
    hf_layercache.register_backend(counted, type(f"Counting{base.__name__}", (base,), {"search": search}))
    return counted


@pytest.fixture(params=FAST)
def backend(request):
    if request.param not in hf_layercache.available_backends():
        pytest.skip(f"{request.param} is not installed")
    name = counting_backend(request.param)
    yield name
    BACKENDS.unregister(name)


def run(model, batch, namespace):
    with torch.no_grad(), model.layer_cache.namespace(namespace):
        return model(**batch).last_hidden_state


def variants(batch: dict, n: int, seed: int) -> dict:
    """One batch of ``n`` rows like the one row of ``batch``, with one token changed each: sent at once, every row
    misses and is stored (later rows would hit the first ones)."""
    g = torch.Generator().manual_seed(seed)
    rows = {k: v.repeat(n, 1) for k, v in batch.items()}
    columns = torch.randint(0, rows["input_ids"].shape[1], (n,), generator=g)
    rows["input_ids"][torch.arange(n), columns] = torch.randint(3, VOCAB, (n,), generator=g)
    return rows


def one_token_changed(batch: dict) -> dict:
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, 2] = (changed["input_ids"][:, 2] + 1) % (VOCAB - 3) + 3
    return changed


def tenant_a_request(config: LayerCacheConfig, other_tenant_prompts: int) -> tuple[int, torch.Tensor, dict]:
    """Tenant A stores a prompt; tenant B sends ``other_tenant_prompts`` prompts nearer A's next one than A's own
    entry (that very prompt and variants of it); then A sends its next prompt. Returns A's index searches, output and
    hits and misses for that last request."""
    model = hf_layercache.enable(tiny_model("bert"), config)
    try:
        stored = tiny_batch("bert", batch=1)
        asked = one_token_changed(stored)
        run(model, stored, "tenant-a")
        if other_tenant_prompts:
            run(model, variants(asked, other_tenant_prompts, seed=5), "tenant-b")
        before = dict(model.layer_cache.stats()["total"])
        SEARCHES["count"] = 0
        out = run(model, asked, "tenant-a")
        after = model.layer_cache.stats()["total"]
        return SEARCHES["count"], out, {k: after[k] - before[k] for k in ("hits", "misses")}
    finally:
        hf_layercache.disable(model)


@pytest.mark.parametrize("strategy", ["semantic", "attention"])
def test_a_tenants_searches_and_results_do_not_depend_on_another_tenants_entries(strategy, backend):
    """Before: B's near entries made A's search widen (semantic 6 searches against 3, attention 9 against 3 on this
    model), which A could time. Now each tenant has an index of its own and the work is the same."""
    options = {"attention_gate_interval": 0} if strategy == "attention" else {"verify_fraction": 0.0, "edits": "any"}
    config = LayerCacheConfig(strategy=strategy, backend=backend, threshold=0.3, **options)
    alone, alone_out, alone_counts = tenant_a_request(config, other_tenant_prompts=0)
    crowded, crowded_out, crowded_counts = tenant_a_request(config, other_tenant_prompts=12)
    assert alone_counts["hits"] > 0  # A's own entry is served
    assert (crowded, crowded_counts) == (alone, alone_counts)
    assert torch.equal(crowded_out, alone_out)


def test_a_tenant_with_no_entries_searches_nothing_whatever_others_stored(backend):
    """A tenant with no entries of its own makes no search, also when the bank holds another tenant's."""
    config = LayerCacheConfig(strategy="semantic", backend=backend, threshold=0.5, verify_fraction=0.0)
    model = hf_layercache.enable(tiny_model("bert"), config)
    batch = tiny_batch("bert", batch=1)
    run(model, batch, "tenant-b")
    SEARCHES["count"] = 0
    run(model, batch, "tenant-a")
    assert SEARCHES["count"] == 0
    hf_layercache.disable(model)


def test_another_tenants_near_entries_never_turn_a_hit_into_a_miss():
    """The crowding reproducer: with one index for every tenant, B's entries trained an IVF index whose list the
    query probes (nprobe=1) did not hold A's entry, so A's hit became a miss however far the search widened. A's
    own index holds A's key alone and finds it."""
    if "faiss" not in hf_layercache.available_backends():
        pytest.skip("faiss is not installed")
    ivf = {"index": "IVF2,Flat", "nprobe": 1, "train_size": 78, "background": False}
    bank = CacheBank("b", LRUPolicy(), backend=hf_layercache.get_backend("faiss")(8, **ivf))
    u, w = torch.eye(8)[0], torch.eye(8)[1]
    own = bank.put(TensorEntry({"v": torch.zeros(1)}), key=u + 1.2 * w, namespace=1)  # cosine 0.64 with u
    assert bank.search(u[None], k=1, namespace=1)[1][0, 0].item() == own  # a hit while A is alone
    g = torch.Generator().manual_seed(0)
    for centre in (u, w):  # B's entries: two clusters, around the query and around the far side of A's key
        for _ in range(60):
            key = centre + 0.05 * torch.randn(8, generator=g)
            bank.put(TensorEntry({"v": torch.zeros(1)}), key=key, namespace=2)
    scores, ids = bank.search(u[None], k=4, namespace=1)
    assert ids[0].tolist()[0] == own and scores[0, 0].item() > 0.6
    assert bank.namespace_counts() == {1: 1, 2: 120}


def test_with_a_quota_another_tenant_filling_the_bank_evicts_its_own_entries_only():
    """Before, B's new entries evicted A's (one shared eviction order). With ``namespace_quota=0.5`` B's inserts
    evict B's own entries once B holds half the bank."""
    bank = CacheBank("b", LRUPolicy(), max_entries=10, namespace_quota=0.5)
    mine = [bank.put(TensorEntry({"v": torch.full((4,), float(i))}), namespace=1) for i in range(5)]
    for i in range(100):
        bank.put(TensorEntry({"v": torch.full((4,), float(i))}), namespace=2)
    assert all(entry_id in bank for entry_id in mine)
    assert bank.namespace_counts() == {1: 5, 2: 5}
    over = bank.put(TensorEntry({"v": torch.zeros(4)}), namespace=1)  # A past its own quota evicts its own oldest
    assert over in bank and mine[0] not in bank and bank.namespace_counts() == {1: 5, 2: 5}


def test_a_byte_quota_holds_against_another_tenants_inserts_and_index(backend):
    """The byte quota counts a tenant's entries and its own index's overhead."""
    bank = CacheBank(
        "b", LRUPolicy(), backend=hf_layercache.get_backend(backend)(16), max_bytes=60_000, namespace_quota=0.5
    )
    g = torch.Generator().manual_seed(0)
    mine = [
        bank.put(TensorEntry({"h": torch.randn(64)}), key=torch.randn(16, generator=g), namespace=1) for _ in range(5)
    ]
    for _ in range(300):
        bank.put(TensorEntry({"h": torch.randn(64)}), key=torch.randn(16, generator=g), namespace=2)
        assert bank.nbytes <= bank.max_bytes
    assert all(entry_id in bank for entry_id in mine)
    assert bank.namespace_nbytes(2) <= 30_000


def test_with_a_quota_a_tenants_outputs_survive_another_tenants_traffic_and_a_warm_restart(tmp_path):
    """A's outputs and hits with B flooding the cache equal A's alone (the quota keeps A's entries), also after
    save and load (each tenant's index is rebuilt from the saved keys)."""
    config = LayerCacheConfig(
        strategy="semantic", threshold=0.3, verify_fraction=0.0, max_entries=8, namespace_quota=0.5, edits="any"
    )  # edits="any": the asked prompt is the stored one with one token changed, which the default computes
    stored = tiny_batch("bert", batch=1)
    asked = one_token_changed(stored)

    def a_after(b_prompts: int, restart: bool) -> tuple[torch.Tensor, int]:
        model = hf_layercache.enable(tiny_model("bert"), config)
        run(model, stored, "tenant-a")
        for seed in range(b_prompts):  # unrelated prompts: each misses and is stored
            run(model, tiny_batch("bert", batch=4, seed=100 + seed), "tenant-b")
        if restart:
            model.layer_cache.save(tmp_path)
            hf_layercache.disable(model)
            model = hf_layercache.enable(tiny_model("bert"), config)
            model.layer_cache.load(tmp_path)
        hits = model.layer_cache.stats()["total"]["hits"]
        out = run(model, asked, "tenant-a")
        hits = model.layer_cache.stats()["total"]["hits"] - hits
        hf_layercache.disable(model)
        return out, hits

    alone, alone_hits = a_after(0, restart=False)
    assert alone_hits > 0
    for restart in (False, True):
        crowded, crowded_hits = a_after(5, restart)
        assert crowded_hits == alone_hits
        assert torch.equal(crowded, alone)


@pytest.mark.parametrize(
    ("value", "extra"), [(0.0, {}), (1.5, {}), (float("nan"), {}), (True, {}), (0.5, {"max_entries": None})]
)
def test_namespace_quota_is_a_config_field_and_bad_values_name_it(value, extra):
    assert LayerCacheConfig(namespace_quota=0.25).to_dict()["namespace_quota"] == 0.25
    with pytest.raises(ValueError, match="namespace_quota"):
        LayerCacheConfig(namespace_quota=value, **extra)
