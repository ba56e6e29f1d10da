"""Sets of positions in one request row: changed positions read and written as contiguous runs, and what the
row's mask says about each position (live, empty, every key attended), worked out once per request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .masks import all_true, any_along
from .request_state import PATTERNS

_MERGE_GAP = 8
"""Changed positions at most this far apart are recomputed as one run, with the unchanged ones between them."""
_MAX_RUNS = 8
"""Changed positions in more runs than this are gathered by index instead of sliced run by run."""


class Positions:
    """A sorted set of positions, read and written as contiguous runs when it has few of them: on a (heads, L, L)
    map, slicing the columns of a run costs a small fraction of gathering the same columns by index. Short gaps
    between runs are filled in (recomputing an unchanged position exactly is harmless)."""

    def __init__(self, index: torch.Tensor):
        runs: list[list[int]] = []
        for position in index.tolist():
            if runs and position - runs[-1][1] <= _MERGE_GAP:
                runs[-1][1] = position + 1
            else:
                runs.append([position, position + 1])
        if len(runs) > _MAX_RUNS:
            self.index, self.runs = index, None
        else:  # positions inside a merged gap are recomputed too: exact either way, and cheaper than a gather
            self.index = torch.cat([torch.arange(a, b, device=index.device) for a, b in runs]) if runs else index
            self.runs = runs

    def __len__(self) -> int:
        return self.index.numel()

    def union(self, other: torch.Tensor) -> Positions:
        return Positions(torch.unique(torch.cat([self.index, other])))

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """``tensor`` restricted to these positions along ``dim`` (a view when they form one run: read only)."""
        if self.runs is None:
            return tensor.index_select(dim, self.index)
        parts = [tensor.narrow(dim, start, stop - start) for start, stop in self.runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def put(self, tensor: torch.Tensor, dim: int, values: torch.Tensor) -> None:
        """Write ``values`` (as :meth:`take` would have read them) into ``tensor`` in place."""
        if self.runs is None:
            tensor.index_copy_(dim, self.index, values)
            return
        offset = 0
        for start, stop in self.runs:
            tensor.narrow(dim, start, stop - start).copy_(values.narrow(dim, offset, stop - start))
            offset += stop - start


@dataclass
class Pattern:
    """What a request row's (L, L) mask says, worked out once per request: every layer gets the same mask."""

    live: torch.Tensor
    """Positions some query attends to. The others (padding) influence no other position: their rows are served
    as stored and never verified."""
    empty: torch.Tensor
    """Queries with nothing to attend to (eager gives them a uniform row); computed when live."""
    full: bool
    """Every query attends every key (no padding, bidirectional): masking is skipped."""
    live_count: int
    """How many positions are live: what a reuse's share of recomputed positions is measured against (padding to
    ``max_length`` must not make half of an unrelated row look reusable)."""

    @classmethod
    def of(cls, keep: torch.Tensor) -> Pattern:
        live = any_along(keep, 0)
        return cls(live, ~any_along(keep, -1), all_true(keep), int(live.sum()))


def request_patterns(state: dict[str, Any], keep: torch.Tensor) -> list[Pattern]:
    """Per batch row, the :class:`Pattern` of ``keep`` (batch, 1, L, L), kept in the request's ``state``: the model
    passes the same mask tensor to every layer, so each layer after the first finds it worked out."""
    cache = state.setdefault(PATTERNS, {})
    signature = (keep.data_ptr(), tuple(keep.shape), keep.stride())
    if signature not in cache:
        cache[signature] = [Pattern.of(keep[b, 0]) for b in range(keep.shape[0])]
    return cache[signature]
