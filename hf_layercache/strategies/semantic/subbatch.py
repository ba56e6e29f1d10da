"""Computing some rows of a padded batch: in groups of rows of similar length, each cut to the columns its rows use.

A batch is padded to its longest row, and a layer computes every column of every row it is given. When only some
rows compute (the others are served), they need not pay for the batch's longest row: on the campaign stream of
docs/benchmarks.md, the computed rows of mixed batches held 18.4k real tokens in 25.3k padded ones. Rows sorted by
length are split where one more layer call costs less than the padding it saves, and each group's call is cut to
the span of columns its rows' real tokens cover.

Cutting columns needs to know every argument's sequence axis, so it is done only for calls that carry nothing per
token but the hidden state and the attention mask (:func:`~.partial.plain_call`); other calls compute the rows at
full length, as before. A padding column a group leaves out keeps its input state: no real token attends to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .alignment import Index

CALL_COST_TOKENS = 16
"""What one more layer call costs, in padded tokens it would have to save: a call's fixed work (Python, kernel
launches, small-matrix inefficiency) measured about 0.3 ms on MiniLM on one CPU thread, where a token costs about
0.05 ms per layer; on larger models a token costs more and the split pays sooner."""


@dataclass(frozen=True)
class Group:
    """Rows computed in one layer call, on the columns ``start:stop`` of the batch."""

    rows: list[int]
    start: int
    stop: int


def span(positions: Index, length: int) -> tuple[int, int]:
    """The columns a row's real tokens cover: ``(first, last + 1)``; a row without any covers the first column (a
    layer call needs one)."""
    if isinstance(positions, slice):
        start = positions.start or 0
        stop = length if positions.stop is None else positions.stop
        return (start, stop) if stop > start else (0, 1)
    if positions.numel() == 0:
        return (0, 1)
    return int(positions[0]), int(positions[-1]) + 1


def shifted(positions: Index, start: int) -> Index:
    """A row's ``positions`` in a call cut to start at column ``start``."""
    if not start:
        return positions
    if isinstance(positions, slice):
        return slice((positions.start or 0) - start, None if positions.stop is None else positions.stop - start)
    return positions - start


def groups(rows: list[int], spans: dict[int, tuple[int, int]]) -> list[Group]:
    """``rows`` in groups of similar span, each with the columns its rows cover, so that the padded tokens computed
    plus :data:`CALL_COST_TOKENS` per group are fewest: a split of the rows' distinct spans sorted by width, found
    by dynamic programming (quadratic in the number of distinct spans, at most the batch's length)."""
    by_span: dict[tuple[int, int], list[int]] = {}
    for row in rows:
        by_span.setdefault(spans[row], []).append(row)
    ordered = sorted(by_span, key=lambda s: s[1] - s[0])
    n = len(ordered)
    best = [0.0] + [float("inf")] * n  # best[i]: the least cost of the rows of the first i spans
    cut = [0] * (n + 1)
    for stop in range(1, n + 1):
        start_col, stop_col, count = *ordered[stop - 1], 0
        for first in range(stop - 1, -1, -1):  # one group for the spans ordered[first:stop]
            start_col, stop_col = min(start_col, ordered[first][0]), max(stop_col, ordered[first][1])
            count += len(by_span[ordered[first]])
            cost = best[first] + count * (stop_col - start_col) + CALL_COST_TOKENS
            if cost <= best[stop]:  # a tie goes to the larger group: fewer calls
                best[stop], cut[stop] = cost, first
    out = []
    while n > 0:
        members = ordered[cut[n] : n]
        group_rows = sorted(r for s in members for r in by_span[s])
        out.append(Group(group_rows, min(s[0] for s in members), max(s[1] for s in members)))
        n = cut[n]
    return out[::-1]


def cut_columns(arguments: dict[str, Any], hidden_name: str, start: int, stop: int) -> dict[str, Any] | None:
    """A plain call's arguments (hidden state and mask, already cut to its rows) on the columns ``start:stop``, or
    ``None`` when the mask has a shape whose sequence axes are not known."""
    hidden = arguments[hidden_name]
    length = hidden.shape[1]
    if (start, stop) == (0, length):
        return arguments
    out = {**arguments, hidden_name: hidden[:, start:stop]}
    mask = arguments.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 2 and mask.shape[1] == length:
            out["attention_mask"] = mask[:, start:stop]
        elif mask.dim() == 4 and mask.shape[-1] == length and mask.shape[-2] in (1, length):
            mask = mask[..., start:stop]
            out["attention_mask"] = mask if mask.shape[-2] == 1 else mask[..., start:stop, :]
        else:
            return None
    return out
