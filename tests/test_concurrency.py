"""One model shared by many threads, as in a web server: outputs stay exact, banks and stats stay consistent."""

import threading

import torch
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig

THREADS, REQUESTS = 8, 200


def test_eight_threads_share_one_exact_cache():
    model = tiny_model("bert")
    distinct = [tiny_batch("bert", batch=2, seed=s) for s in range(12)]
    with torch.no_grad():
        expected = [model(**b).last_hidden_state for b in distinct]
    hf_layercache.enable(model, LayerCacheConfig(max_entries=16))  # small: evictions race with lookups too
    errors: list[str] = []

    def worker(thread: int) -> None:
        for i in range(REQUESTS):
            k = (thread * 7 + i * 5) % len(distinct)
            ns = "a" if i % 3 else "b"
            with model.layer_cache.namespace(ns), torch.no_grad():
                out = model(**distinct[k]).last_hidden_state
            if not torch.allclose(out, expected[k], rtol=0, atol=1e-6):
                errors.append(f"thread {thread} request {i}: output differs by {(out - expected[k]).abs().max()}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(previous)
    assert errors == []
    report = model.layer_cache.stats()
    rows = THREADS * REQUESTS * 2
    for counters in report["layers"].values():
        assert counters["lookups"] == rows
        assert counters["hits"] + counters["misses"] == rows
        assert counters["hits"] > 0 and counters["misses"] > 0
    bank = model.layer_cache.banks["encoder.layer"]
    assert len(bank) <= 16
    assert len(bank.policy) == len(bank)
    assert bank.nbytes == sum(e.nbytes for e in bank._entries.values())
