"""Per-row reuse in a batch: which rows share a call, and where each row's cached prefix sits in that call.

A call computes one rectangle, columns ``[split, L)`` of every row, after a ``DynamicCache`` holding columns
``[0, split)``. Row ``r`` (real tokens in columns ``[first, first + length)``, ``cached`` of them in the bank) would
have to recompute its cached tokens in ``[split, first + cached)`` if they stayed in the caller's columns. They do
not: its cached tokens are laid into the cache at ``[split - cached, split)`` (which needs ``split >= cached``), and
the columns of the rectangle they left become a hole that the call's attention mask hides. Positions come from
``position_ids``, so a token keeps its position whatever column it sits in. After the call, the row's cached states
are written back to the caller's columns (:func:`moves`), so the returned cache and hidden states have the
caller's layout and ``generate`` decodes on with the caller's mask.

Rows that cannot share a rectangle that way (a cold row beside warm ones: its ``split`` would be ``0``, where no
cached prefix fits) or whose sharing would waste more than a call costs, go into separate calls (groups).
"""

from __future__ import annotations

import torch

from .run import Group, Row

CALL_COST_TOKENS = 64
"""What one more call costs, in token-columns of one row: a call reads every weight once however few tokens it
computes. Rows join a group while the rectangle they widen costs the group fewer extra token-columns than this."""


def copies(rows: list[Row], input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
    """Per row, the first row of the batch it repeats (itself when it repeats none): the same input ids and mask in
    every column, so uncached transformers computes the same states for both. Only rows that may reuse are matched
    (their positions are ``0..n-1`` from the mask)."""
    seen: dict[bytes, int] = {}
    sources = []
    for r, row in enumerate(rows):
        if row.tokens is None or not row.length:
            sources.append(r)
            continue
        key = input_ids[r].numpy().tobytes() + (mask[r].numpy().tobytes() if mask is not None else b"")
        sources.append(seen.setdefault(key, r))
    return sources


def plan(rows: list[Row], width: int, block_size: int, sources: list[int] | None = None) -> list[Group]:
    """Every row reuses all it has cached (less its last token, which is always computed); rows are grouped by
    where their cached prefix ends, widest first, and a row starts a new group when it cannot join the last one
    (a longer cached prefix in the group than the row's own end) or would cost it more than a call. A row that
    repeats another of the batch (``sources``, :func:`copies`) is in no group: the other's result is copied, so its
    tokens count as reused and it stores nothing. Sets each row's :attr:`~.run.Row.reused`."""
    ends = []
    for r, row in enumerate(rows):
        if sources is not None and sources[r] != r:
            row.repeat()
            continue
        row.reused = min(row.cached(block_size), row.length - 1) if row.tokens is not None and row.length else 0
        if row.length:  # a row that may not reuse is computed whole, pad columns included, as uncached computes it
            ends.append((row.first + row.reused if row.tokens is not None else 0, r))
    groups: list[Group] = []
    longest = 0  # the longest cached prefix in the last group
    for end, r in sorted(ends, reverse=True):
        group = groups[-1] if groups else None
        if group is not None and longest <= end and len(group.rows) * (group.split - end) <= CALL_COST_TOKENS:
            group.rows.append(r)
            group.split = end
        else:
            group = Group([r], end)
            groups.append(group)
            longest = 0
        longest = max(longest, rows[r].reused)
    if not groups:
        groups.append(Group([], 0))
    groups[0].rows += [r for r, row in enumerate(rows) if not row.length]  # all pads: nothing to compute or move
    for group in groups:
        group.rows.sort()
        group.moved = [i for i, r in enumerate(group.rows) if rows[r].first + rows[r].reused > group.split]
    return groups


def call_mask(group: Group, rows: list[Row], mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """The group's attention mask: the caller's (the group's rows of it), with each moved row's cached tokens
    ending at ``split`` and the columns they left hidden."""
    out = mask.clone() if mask is not None else torch.ones_like(ids)
    for i in group.moved:
        row = rows[group.rows[i]]
        out[i, : row.first + row.reused] = 0
        out[i, group.split - row.reused : group.split] = 1
    return out


def moves(group: Group, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(row, column during the call, caller column)`` of every cached token of a moved row, as index tensors (one
    advanced-indexing copy per layer puts them all back); ``None`` when no row moved."""
    if not group.moved:
        return None
    parts = []
    for i in group.moved:
        row = rows[group.rows[i]]
        t = torch.arange(row.reused)
        parts.append(torch.stack([torch.full_like(t, i), group.split - row.reused + t, row.first + t]))
    index = torch.cat(parts, dim=1)
    return index[0], index[1], index[2]
