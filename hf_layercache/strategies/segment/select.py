"""Choosing the reused tokens to recompute: CacheBlend's deviation at an early layer, or EPIC's first tokens."""

from __future__ import annotations

import math

import torch

from .plan import RowPlan


def budget(plan: RowPlan, share: float) -> int:
    """How many of the row's inexact reused tokens are recomputed at ``share``."""
    candidates = int((plan.reused_mask() & ~plan.exact_mask()).sum())
    return min(candidates, math.ceil(share * candidates))


def first_tokens(plan: RowPlan, share: float) -> torch.Tensor:
    """EPIC: the first ``share`` of each inexactly reused segment (at least one token of each when ``share > 0``):
    attention sinks form at a segment's start, where the stored states saw another context."""
    chosen = torch.zeros(plan.length, dtype=torch.bool)
    candidates = plan.reused_mask() & ~plan.exact_mask()
    if share <= 0:
        return chosen
    for i in plan.entries:
        segment = plan.segments[i]
        count = math.ceil(share * segment.length)
        chosen[segment.start : segment.start + count] = True
    return chosen & candidates


def by_deviation(plan: RowPlan, share: float, deviation: torch.Tensor) -> torch.Tensor:
    """CacheBlend: the ``share`` of inexactly reused tokens whose stored states at the probe layer deviate most from
    the ones this prompt gives them (``deviation``: (n,), per token)."""
    chosen = torch.zeros(plan.length, dtype=torch.bool)
    candidates = plan.reused_mask() & ~plan.exact_mask()
    count = budget(plan, share)
    if count == 0:
        return chosen
    scores = deviation.float().cpu().masked_fill(~candidates, -1.0)
    chosen[scores.topk(count).indices] = True
    return chosen
