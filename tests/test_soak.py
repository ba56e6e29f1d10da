"""The serving path under everything at once (#30): 8 threads of mixed strategies on four models, a real
redis-server killed and restarted under them, and ``disable()``/``enable()``/``clear()`` cycles while they serve.

Bounded by counts, not time: each thread sends a fixed number of requests and the chaos thread a fixed number of
actions, interleaved however the machine runs them. Every output is compared with the model's own uncached output;
no request may raise; every bank stays within ``max_memory`` and the write queues within their byte bound.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig

pytestmark = pytest.mark.usefixtures("one_thread")

REQUESTS, ACTIONS, POOL = 24, 8, 4
BUDGET = 2 * 2**20


def _configs(url: str) -> dict[str, tuple[str, LayerCacheConfig]]:
    shared = {"shared_store": url, "shared_store_kwargs": {"retry_interval": 0.05, "socket_timeout": 0.5}}
    return {
        "exact": ("bert", LayerCacheConfig(strategy="exact", max_memory=BUDGET, **shared)),
        "prefix": ("llama", LayerCacheConfig(strategy="prefix", block_size=4, max_memory=BUDGET, **shared)),
        "semantic": ("bert", LayerCacheConfig(strategy="semantic", verify_fraction=0.0, max_memory=BUDGET)),
        "attention": ("bert", LayerCacheConfig(strategy="attention", max_memory=BUDGET)),
    }


def _serve(model, batch: dict, decoder: bool) -> torch.Tensor:
    with torch.inference_mode():
        options = {"use_cache": False} if decoder else {}
        return model(**batch, **options).last_hidden_state


def _within_budget(model) -> list[str]:
    controller = model.__dict__.get("layer_cache")
    if controller is None:
        return []
    problems = [f"bank {name}: {bank.nbytes} bytes" for name, bank in controller.banks.items() if bank.nbytes > BUDGET]
    if controller.shared is not None and controller.shared.client.queued_bytes > controller.shared.client.queue_bytes:
        problems.append(f"write queue: {controller.shared.client.queued_bytes} bytes")
    return problems


def test_eight_threads_of_mixed_strategies_with_redis_and_switches_failing_under_them(server):
    configs = _configs(server.url)
    models, pools, expected = {}, {}, {}
    for name, (arch, config) in configs.items():
        model = tiny_model(arch, seed=len(models))
        pools[name] = [tiny_batch(arch, batch=2, seed=10 * len(models) + s) for s in range(POOL)]
        expected[name] = [_serve(model, b, arch == "llama") for b in pools[name]]
        models[name] = hf_layercache.enable(model, config)
    wrong, errors, over = [], [], []

    def serve(name: str, thread: int) -> None:
        decoder = configs[name][0] == "llama"
        for i in range(REQUESTS):
            k = (thread + i) % POOL
            try:
                out = _serve(models[name], pools[name][k], decoder)
            except Exception as err:
                errors.append(f"{name} thread {thread} request {i}: {type(err).__name__}: {err}")
                continue
            mask = pools[name][k]["attention_mask"].bool()
            diff = (out[mask] - expected[name][k][mask]).abs().max().item()
            if diff > 1e-4:
                wrong.append(f"{name} thread {thread} request {i}: differs by {diff:.3g}")

    def chaos() -> None:
        names = list(models)
        for step in range(ACTIONS):
            name = names[step % len(names)]
            if step % 2 == 0:
                server.stop()
            hf_layercache.disable(models[name])
            hf_layercache.enable(models[name], configs[name][1])
            models[names[(step + 1) % len(names)]].layer_cache.clear()
            if step % 2 == 0:
                server.start()
            over.extend(problem for model in models.values() for problem in _within_budget(model))

    threads = [threading.Thread(target=serve, args=(name, t)) for name in models for t in range(2)]
    threads.append(threading.Thread(target=chaos))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model in models.values():
        over.extend(_within_budget(model))
        if model.layer_cache.shared is not None:
            model.layer_cache.shared.close()
    assert errors == [] and wrong == [] and over == [], (errors, wrong, over)
    assert sum(m.layer_cache.stats()["total"]["hits"] for m in models.values()) > 0
