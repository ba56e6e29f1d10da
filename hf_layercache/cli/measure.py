"""The measurements ``demo`` and ``bench`` share: wall-clock timing, hit rates from the layers' counters and
fidelity, the cosine similarity of mean-pooled cached and uncached outputs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _counters(model) -> dict[str, tuple[int, int]]:
    """(hits, lookups) of every cached layer, to tell what one stretch of work hit by subtraction."""
    return {name: (c["hits"], c["lookups"]) for name, c in model.layer_cache.stats()["layers"].items()}


def _hit_rates(before: dict, after: dict) -> dict[str, float]:
    rates = {}
    for name, (hits, lookups) in after.items():
        done = lookups - before[name][1]
        rates[name] = (hits - before[name][0]) / done if done else 0.0
    return rates


def _overall(before: dict, after: dict) -> float:
    hits = sum(after[n][0] - before[n][0] for n in after)
    lookups = sum(after[n][1] - before[n][1] for n in after)
    return hits / lookups if lookups else 0.0


def pooled(output: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean over tokens of the last hidden state (or of the logits for models with a head)."""
    states = output.last_hidden_state if getattr(output, "last_hidden_state", None) is not None else output.logits
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1)


LOW_FIDELITY = 0.95
"""Fidelity under which a text's cached output is flagged: a mean can hide a few wrong answers."""


def _fidelity(cached: torch.Tensor, uncached: torch.Tensor) -> dict[str, float]:
    """Mean and lowest cosine similarity between cached and uncached pooled outputs, one per text, and how many
    texts fell below :data:`LOW_FIDELITY`."""
    cosine = torch.cosine_similarity(cached.float(), uncached.float())
    return {"mean": cosine.mean().item(), "min": cosine.min().item(), "low": int((cosine < LOW_FIDELITY).sum())}


def low_fidelity_warning(what: str, fidelity: dict[str, float], texts: int) -> str | None:
    """The warning printed when some text's cached output fell below :data:`LOW_FIDELITY`, else ``None``."""
    if not fidelity["low"]:
        return None
    return (
        f"warning: {what}: {fidelity['low']} of {texts} texts served below fidelity {LOW_FIDELITY} (lowest "
        f"{fidelity['min']:.3f}): those answers are not the uncached ones. Raise the threshold, or use max_error_rate "
        "(docs/semantic.md)."
    )


NOISE_TOLERANCE = 0.25
"""A row's speed ratios are too spread to read when one repeat's lies more than this fraction of their median away
from it (outside 0.75x to 1.25x the median)."""


def too_noisy(ratios: list[float], tolerance: float = NOISE_TOLERANCE) -> bool:
    """True when some ratio lies more than ``tolerance`` times the median away from the median: the repeats
    disagree by more than the effect a reader would look for, so the median says little. One ratio is never noisy
    (there is no spread to judge)."""
    median = statistics.median(ratios)
    return any(abs(ratio - median) > tolerance * median for ratio in ratios)
