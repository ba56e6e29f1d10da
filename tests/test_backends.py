"""Lookup backends: the shared conformance suite over every registered name, then what is specific to each."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import hf_layercache
from hf_layercache.backends import AutoBackend, ExactBackend
from hf_layercache.backends._store import _rebuild_executor
from hf_layercache.backends.auto import ivf_index
from hf_layercache.testing.backends import CHECKS, check_backend

HAS_FAISS = "faiss" in hf_layercache.available_backends()
HAS_ANNOY = "annoy" in hf_layercache.available_backends()
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss is not installed")
needs_annoy = pytest.mark.skipif(not HAS_ANNOY, reason="annoy is not installed")

# Configurations beyond the defaults, chosen so that the conformance data (512 keys) reach the index, not only the
# exact paths: small thresholds, and inline rebuilds where a test must see the index.
VARIANTS = {
    "faiss": [
        {"index": "Flat", "background": False},
        {"index": "HNSW16", "ef_search": 32, "background": False},
        {"index": "IVF8,Flat", "nprobe": 4, "train_size": 312, "background": False},
        {"index": "IVF8,SQ8", "nprobe": 4, "train_size": 312},
        {"index": "IVF8,Flat,RFlat", "nprobe": 4, "train_size": 312, "background": False},  # takes no ID selector
    ],
    "annoy": [{"buffer_size": 32, "background": False}, {"buffer_size": 32}],
    "auto": [{"switch_at": 100}],
}
CONFIGS = [(name, {}) for name in hf_layercache.available_backends()] + [
    (name, kwargs)
    for name, variants in VARIANTS.items()
    if name in hf_layercache.available_backends()
    for kwargs in variants
]


def _config_id(config: tuple[str, dict]) -> str:
    name, kwargs = config
    return name + "".join(f"-{key}={value}" for key, value in kwargs.items())


@pytest.mark.parametrize("config", CONFIGS, ids=[_config_id(config) for config in CONFIGS])
@pytest.mark.parametrize("check", CHECKS, ids=[check.__name__ for check in CHECKS])
def test_conformance(check, config):
    name, kwargs = config
    check(hf_layercache.get_backend(name), **kwargs)


def test_builtin_backends_are_registered():
    names = set(hf_layercache.available_backends())
    assert {"exact", "auto"} <= names
    assert ("faiss" in names) == HAS_FAISS and ("annoy" in names) == HAS_ANNOY


def test_conformance_suite_catches_a_broken_backend():
    class ForgetsRemovals(ExactBackend):
        def remove(self, ids):
            pass

    with pytest.raises(AssertionError, match="after removing every key len is 5"):
        check_backend(ForgetsRemovals)


def _keys(n: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_exact_compacts_removed_slots():
    backend = ExactBackend(32)
    keys = _keys(100)
    for _ in range(20):
        backend.add(torch.arange(100), keys)
    assert len(backend) == 100
    assert backend._store.n <= 125, "re-added keys should not pile up"


@needs_faiss
def test_faiss_hnsw_tombstones_then_rebuild():
    backend = hf_layercache.get_backend("faiss")(32, index="HNSW16", rebuild_ratio=0.25, background=False)
    keys = _keys(400)
    backend.add(torch.arange(400), keys)
    graph = backend._index
    backend.remove(torch.arange(0, 60))
    assert backend.tombstones == 60 and backend._index is graph, "60 <= 0.25 * 340 removals must not rebuild"
    scores, found = backend.search(keys[:60], 1)
    assert not torch.isin(found, torch.arange(60)).any()
    assert (scores[:, 0] < 0.99).all(), "a removed key must not be found as its own best match"
    backend.remove(torch.arange(60, 100))
    assert backend.tombstones == 0 and backend._index is not graph, "100 > 0.25 * 300 removals must rebuild"
    assert backend._index.ntotal == len(backend) == 300
    _, found = backend.search(keys[100:], 1)
    assert found[:, 0].tolist() == list(range(100, 400))


@needs_faiss
def test_faiss_ivf_is_exact_until_trained():
    backend = hf_layercache.get_backend("faiss")(32, index="IVF16,Flat", background=False)
    assert backend.train_size == 39 * 16
    keys = _keys(700)
    backend.add(torch.arange(600), keys[:600])
    assert backend._index is None and backend.buffered == 600
    assert backend.search(keys[:600], 1)[1][:, 0].tolist() == list(range(600))
    backend.add(torch.arange(600, 700), keys[600:])
    assert backend._index is not None and backend._index.is_trained and backend.buffered == 0
    assert backend._index.ntotal == 700


@needs_faiss
def test_faiss_compressed_index_reports_exact_cosines():
    backend = hf_layercache.get_backend("faiss")(32, index="IVF4,SQ4", nprobe=4, train_size=300, background=False)
    keys = _keys(300)
    backend.add(torch.arange(300), keys)
    queries = _keys(8, seed=1)
    scores, found = backend.search(queries, 3)
    expected = (F.normalize(queries, dim=-1)[:, None] * keys[found]).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


@needs_faiss
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"index": "NotAnIndex12"}, "not a FAISS index factory string"),
        ({"index": "IDMap,Flat"}, "drop 'IDMap'"),
        ({"index": "HNSW32", "nprobe": 8}, "nprobe does not apply to index 'HNSW32'"),
        ({"index": "IVF64,Flat", "ef_search": 8}, "ef_search does not apply"),
        ({"ef_search": 0}, "ef_search must be a positive int"),
        ({"index": "IVF64,Flat", "train_size": 10}, r"train_size must be at least 39 \* nlist = 2496"),
        ({"index": "IVF8,Flat", "train_size": 128}, r"at least 39 \* nlist = 312"),
        ({"rebuild_ratio": 0}, "rebuild_ratio must be > 0"),
        ({"index": "NSG16,Flat"}, "builds its graph in one pass"),
    ],
)
def test_faiss_rejects_bad_kwargs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_layercache.get_backend("faiss")(32, **kwargs)


@needs_faiss
def test_faiss_search_parameters_apply_to_the_live_index():
    from hf_layercache.backends.faiss import DEFAULT_EF_SEARCH

    backend = hf_layercache.get_backend("faiss")(32, background=False)
    backend.add(torch.arange(50), _keys(50))
    assert backend._index.hnsw.efSearch == DEFAULT_EF_SEARCH
    backend.set_search_parameters(ef_search=200)
    assert backend._index.hnsw.efSearch == 200
    with pytest.raises(ValueError, match="nprobe does not apply"):
        backend.set_search_parameters(nprobe=4)
    backend.remove(torch.arange(20))  # rebuilds: the new index keeps the setting
    assert backend.tombstones == 0 and backend._index.hnsw.efSearch == 200


@needs_faiss
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_faiss_on_cuda_answers_on_cuda():
    import faiss

    backend = hf_layercache.get_backend("faiss")(32, device="cuda", index="Flat", background=False)
    keys = _keys(200).cuda()
    backend.add(torch.arange(200), keys)
    found = backend.search(keys, 1)[1]
    assert found.device.type == "cuda" and found[:, 0].tolist() == list(range(200))
    if faiss.get_num_gpus():
        assert isinstance(faiss.downcast_index(backend._index), faiss.GpuIndex)


@needs_annoy
def test_annoy_side_buffer_then_rebuild():
    backend = hf_layercache.get_backend("annoy")(32, buffer_size=50, background=False)
    keys = _keys(300)
    backend.add(torch.arange(100), keys[:100])
    forest = backend._index
    assert forest is not None and backend.buffered == 0
    backend.add(torch.arange(100, 140), keys[100:140])
    assert backend._index is forest and backend.buffered == 40, "Annoy is immutable: new keys wait in the buffer"
    assert backend.search(keys[100:140], 1)[1][:, 0].tolist() == list(range(100, 140)), "the buffer is searched"
    backend.remove(torch.arange(0, 10))
    assert backend._index is forest and backend.tombstones == 10
    assert not torch.isin(backend.search(keys[:10], 3)[1], torch.arange(10)).any()
    backend.add(torch.arange(140, 150), keys[140:150])
    assert backend._index is not forest, "40 buffered + 10 removed + 10 more > 50 must rebuild"
    assert backend.buffered == 0 and backend.tombstones == 0 and len(backend) == 140
    assert backend.search(keys[10:150], 1)[1][:, 0].tolist() == list(range(10, 150))


@needs_annoy
def test_annoy_background_rebuild_keeps_answering_and_keeps_changes():
    backend = hf_layercache.get_backend("annoy")(32, buffer_size=50)
    keys = _keys(300)
    release = threading.Event()
    _rebuild_executor().submit(release.wait)  # holds the worker so the build stays pending while we change things
    try:
        backend.add(torch.arange(200), keys[:200])
        assert backend._pending is not None and backend._index is None
        backend.remove(torch.arange(0, 20))
        backend.add(torch.arange(200, 230), keys[200:230])
        backend.add(torch.tensor([25]), keys[299:300])
        found = backend.search(keys[20:230], 1)[1][:, 0].tolist()
        assert found[:5] == list(range(20, 25)) and found[5] != 25 and found[6:] == list(range(26, 230))
    finally:
        release.set()
    backend.wait()
    assert backend._index is not None and len(backend) == 210
    found = backend.search(keys[:230], 1)[1][:, 0]
    assert not torch.isin(found, torch.arange(20)).any(), "removals made during the build are kept"
    assert found[20:25].tolist() == list(range(20, 25)) and found[25] != 25
    assert found[26:].tolist() == list(range(26, 230))
    assert backend.search(keys[299:300], 1)[1][0, 0] == 25, "a key replaced during the build keeps its new value"


def test_auto_switches_at_the_threshold_and_back():
    backend = AutoBackend(32, switch_at=100)
    keys = _keys(150)
    backend.add(torch.arange(99), keys[:99])
    assert isinstance(backend.current, ExactBackend)
    backend.add(torch.arange(99, 150), keys[99:])
    approximate = not isinstance(backend.current, ExactBackend)
    assert approximate == (HAS_FAISS or HAS_ANNOY)
    assert len(backend) == 150 and backend.search(keys, 1)[1][:, 0].tolist() == list(range(150))
    backend.remove(torch.arange(101))
    assert isinstance(backend.current, ExactBackend), "below switch_at // 2 the search goes back to exact"
    assert backend.search(keys[101:], 1)[1][:, 0].tolist() == list(range(101, 150))


@needs_faiss
def test_auto_replans_the_ivf_index_as_the_bank_grows():
    assert [ivf_index(n) for n in (100, 4096, 100_000, 1_000_000)] == [
        "IVF2,Flat",
        "IVF64,Flat",
        "IVF256,Flat",
        "IVF1024,Flat",
    ]
    backend = AutoBackend(32, switch_at=100)
    keys = _keys(500)
    backend.add(torch.arange(100), keys[:100])
    backend.current.wait()
    assert backend.current.index_string == "IVF2,Flat"
    for i in range(100, 500, 50):
        backend.add(torch.arange(i, i + 50), keys[i : i + 50])
        backend.current.wait()
    assert backend.current.index_string == "IVF8,Flat", "grown 4x: re-planned to about sqrt(n) lists"
    assert backend.current._index.ntotal == 500 and backend.current.buffered == 0
    assert backend.search(keys, 1)[1][:, 0].tolist() == list(range(500))


@needs_faiss
def test_auto_loads_a_large_state_straight_into_the_index():
    source = ExactBackend(32)
    source.add(torch.arange(120), _keys(120))
    backend = AutoBackend(32, switch_at=100)
    backend.load_state_dict(source.state_dict())
    assert type(backend.current).__name__ == "FaissBackend" and len(backend) == 120


def test_auto_rejects_bad_switch_at():
    with pytest.raises(ValueError, match="switch_at must be an int >= 2"):
        AutoBackend(32, switch_at=1)
