"""Hit rates of every registered eviction policy on two simulated request streams, from one run.

    python benchmarks/policies.py                  # the figures in docs/benchmarks.md
    python benchmarks/policies.py --requests 20000 # a quick look

Streams (fixed seed): (a) ``zipf``: requests drawn from Zipf(1.1) over ``--keys`` distinct keys; (b) ``drifting``:
the same Zipf(1.1) ranks, but every ``--phase`` requests the keys are reshuffled, so a new popular set takes over;
and the same drifting more slowly, every ``--slow-phase`` requests, to show when memory of frequency pays.
Each policy class is driven through its public contract by a small cache loop that holds ``--capacity`` entries:
a hit calls ``on_hit``; a miss calls ``on_miss``, then ``victims`` and ``on_remove`` when full, then ``on_insert``.
Entries are all the same size and cost, as the entries of one layer's bank roughly are, so the rows compare the
policies' use of recency and frequency. ``belady`` is the offline optimum (evict the entry needed furthest in the
future), an upper bound no online policy reaches. The oracle row clears LFU's counts exactly when the popular set
changes, which no real policy can know: what frequency could add on top of recency within one phase. Time per
request covers the whole loop, policy included.
"""

from __future__ import annotations

import argparse
import heapq
import math
import time
from collections.abc import Callable

import numpy as np

import hf_layercache
from hf_layercache.policies.base import Policy

ENTRY_BYTES = 4096
ENTRY_COST = 1e-3  # seconds of compute a hit saves
SWEEP = {"staleness": [{"half_life": h} for h in (1000, 16000)]}
ORACLE = "lfu, counts cleared at each phase change (oracle)"


def zipf_ranks(rng: np.random.Generator, requests: int, keys: int, exponent: float = 1.1) -> np.ndarray:
    """``requests`` ranks in [0, keys), rank r drawn with probability proportional to (r + 1) ** -exponent."""
    weights = np.arange(1, keys + 1, dtype=np.float64) ** -exponent
    return rng.choice(keys, size=requests, p=weights / weights.sum())


def drifting(rng: np.random.Generator, requests: int, keys: int, phase: int) -> list[int]:
    """Zipf(1.1) ranks mapped to keys through a new random permutation every ``phase`` requests."""
    ranks = zipf_ranks(rng, requests, keys)
    for start in range(0, requests, phase):
        ranks[start : start + phase] = rng.permutation(keys)[ranks[start : start + phase]]
    return ranks.tolist()


def streams(requests: int, keys: int, phase: int, slow_phase: int, seed: int) -> dict[str, tuple[list[int], int]]:
    """Column name -> (requests, phase length); the stationary stream's phase is its whole length."""
    rng = np.random.default_rng(seed)
    return {
        "zipf": (zipf_ranks(rng, requests, keys).tolist(), requests),
        f"drifting, {phase:,}": (drifting(rng, requests, keys, phase), phase),
        f"drifting, {slow_phase:,}": (drifting(rng, requests, keys, slow_phase), slow_phase),
    }


def simulate(make: Callable[[], Policy], stream: list[int], capacity: int, forget_every: int | None = None) -> int:
    """Hits of a cache of ``capacity`` equal entries run by the policy ``make()`` builds over ``stream``.

    ``forget_every``: every so many requests, replace the policy by a fresh one holding the same entries,
    re-inserted in eviction order, as an oracle that knows when popularity changes would.
    """
    policy = make()
    cached: set[int] = set()
    hits = 0
    for i, key in enumerate(stream):
        if forget_every and i and i % forget_every == 0:
            order, policy = list(policy.eviction_order()), make()
            for entry_id in order:
                policy.on_insert(entry_id, ENTRY_BYTES, ENTRY_COST)
        if key in cached:
            hits += 1
            policy.on_hit(key, 1.0)
            continue
        policy.on_miss()
        if len(cached) >= capacity:
            for victim in policy.victims(ENTRY_BYTES):
                cached.remove(victim)
                policy.on_remove(victim)
        cached.add(key)
        policy.on_insert(key, ENTRY_BYTES, ENTRY_COST)
    return hits


def belady(stream: list[int], capacity: int) -> int:
    """Hits of the offline optimum: on a miss with a full cache, evict the entry whose next request is furthest."""
    next_use, seen = [math.inf] * len(stream), {}
    for i in range(len(stream) - 1, -1, -1):
        next_use[i], seen[stream[i]] = seen.get(stream[i], math.inf), i
    cached: dict[int, float] = {}
    heap: list[tuple[float, int]] = []
    hits = 0
    for i, key in enumerate(stream):
        if key in cached:
            hits += 1
        elif len(cached) >= capacity:
            while True:
                far, victim = heapq.heappop(heap)
                if cached.get(victim) == -far:
                    del cached[victim]
                    break
        cached[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    return hits


def contenders() -> list[tuple[str, Callable[[], Policy] | None]]:
    """Every registered policy with its defaults, the sweep rows, the oracle, then the offline bound (``None``)."""
    rows: list[tuple[str, Callable[[], Policy] | None]] = []
    for name in hf_layercache.available_policies():
        cls = hf_layercache.get_policy(name)
        rows.append((name, cls))
        for kwargs in SWEEP.get(name, []):
            label = f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
            rows.append((label, lambda cls=cls, kwargs=kwargs: cls(**kwargs)))
    rows.append((ORACLE, hf_layercache.get_policy("lfu")))
    rows.append(("belady (offline bound)", None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--capacity", type=int, default=2_000)
    parser.add_argument("--phase", type=int, default=10_000, help="requests between popular-set changes")
    parser.add_argument("--slow-phase", type=int, default=50_000, help="the same, for the slowly drifting column")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = streams(args.requests, args.keys, args.phase, args.slow_phase, args.seed)
    print(
        f"{args.requests:,} requests over {args.keys:,} keys, room for {args.capacity:,}, Zipf(1.1), seed {args.seed}; "
        "columns: hit rate on each stream (drifting: new popular set every so many requests)\n"
    )
    print(f"| policy | {' | '.join(data)} | µs / request |")
    print(f"|---|{'---:|' * len(data)}---:|")
    rates: dict[str, dict[str, float]] = {}
    for label, make in contenders():
        cells, seconds, measured = [], 0.0, 0
        for column, (stream, phase) in data.items():
            if label == ORACLE and phase == len(stream):
                cells.append("-")
                continue
            start = time.perf_counter()
            if make is None:
                hits = belady(stream, args.capacity)
            else:
                hits = simulate(make, stream, args.capacity, phase if label == ORACLE else None)
            seconds, measured = seconds + time.perf_counter() - start, measured + len(stream)
            rates.setdefault(label, {})[column] = hits / len(stream)
            cells.append(f"{hits / len(stream):.4f}")
        per_request = "-" if make is None or label == ORACLE else f"{1e6 * seconds / measured:.1f}"
        print(f"| {label} | {' | '.join(cells)} | {per_request} |", flush=True)

    goal = list(data)[1]
    best = max(("staleness", "cost"), key=lambda name: rates[name][goal])
    verdict = "met" if rates[best][goal] > rates["lru"][goal] else "missed"
    print(
        f"\nGoal (staleness or cost beats lru on '{goal}'): {verdict}, "
        f"best {best} {rates[best][goal]:.4f} vs lru {rates['lru'][goal]:.4f}"
    )


if __name__ == "__main__":
    main()
