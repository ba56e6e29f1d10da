"""Memory budgets under churn, and warm caches larger than the bank that loads them (issue #16 items 4 and 10).

    python benchmarks/budget.py                  # ~1 min
    python benchmarks/budget.py --inserts 3000   # a longer churn

Part 1, the budget: every backend behind one LRU bank of ``--budget`` bytes takes ``--inserts`` entries (a 16x8
float32 state and a 32-dimensional key each) with a search after every third insert, the traffic of a full semantic
bank. After each insert and each search the counted bytes (``bank.nbytes``, what ``max_memory`` limits) are read:
the table gives their peak against the budget, the entries the bank held at the end and at its lowest after the
first third, and the median time of an insert (with its evictions) relative to the exact backend's.

Part 2, trimming on load: a warm cache of ``--saved`` entries of a tiny BERT is loaded into a bank of
``max_entries=10`` and into one large enough for all of them, in the same process: the time ratio and the tensors
read show that the entries the policy would evict are never read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.bank import CacheBank

BACKENDS = [("exact", {}), ("faiss", {}), ("annoy", {}), ("annoy", {"background": False}), ("auto", {"switch_at": 64})]


def churn(name: str, kwargs: dict, budget: int, inserts: int) -> dict:
    torch.manual_seed(0)
    bank = CacheBank(
        "b", hf_layercache.get_policy("lru")(), hf_layercache.get_backend(name)(32, **kwargs), max_bytes=budget
    )
    peak, sizes, times = 0.0, [], []
    for i in range(inserts):
        values, key = {"h": torch.randn(16, 8)}, torch.randn(32)
        start = time.perf_counter()
        bank.put(values, key=key)
        times.append(time.perf_counter() - start)
        peak = max(peak, bank.nbytes / budget)
        if i % 3 == 0:
            bank.search(torch.randn(2, 32), k=2)
            peak = max(peak, bank.nbytes / budget)
        sizes.append(len(bank))
    return {"peak": peak, "end": len(bank), "low": min(sizes[inserts // 3 :]), "insert": statistics.median(times)}


def load_seconds(directory: Path, max_entries: int | None) -> tuple[float, int]:
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(max_entries=max_entries))
    start = time.perf_counter()
    model.layer_cache.load(directory)
    return time.perf_counter() - start, model.layer_cache.stats()["banks"]["encoder.layer"]["entries"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=120_000)
    parser.add_argument("--inserts", type=int, default=1200)
    parser.add_argument("--saved", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"Budget {args.budget:,} bytes, {args.inserts:,} inserts, LRU")
    print(f"{'backend':<28} {'peak/budget':>11} {'entries end':>11} {'lowest':>7} {'insert vs exact':>15}")
    rows = [(f"{n} {k or ''}".strip(), churn(n, k, args.budget, args.inserts)) for n, k in BACKENDS]
    exact = rows[0][1]["insert"]
    for label, r in rows:
        print(f"{label:<28} {r['peak']:>10.3f}x {r['end']:>11} {r['low']:>7} {r['insert'] / exact:>14.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(max_entries=args.saved))
        with torch.no_grad():
            model(**tiny_batch("bert", batch=args.saved, seed=3))
        model.layer_cache.save(tmp)
        small, kept = min(load_seconds(Path(tmp), 10) for _ in range(3))
        whole, loaded = min(load_seconds(Path(tmp), args.saved) for _ in range(3))
    print(
        f"\nLoading {args.saved:,} saved entries (best of 3): into max_entries=10 {small * 1e3:.0f} ms ({kept} kept), "
    )
    print(f"into a bank that keeps them all {whole * 1e3:.0f} ms ({loaded} kept): {whole / small:.1f}x the time")


if __name__ == "__main__":
    main()
