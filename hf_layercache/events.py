"""The two things a strategy reports about its entries, each once, to every reader (the bank's policy and the stats).

A :class:`Lookup` says what one lookup decided: the entries that served rows, with their similarity, and how many
rows found nothing usable. A :class:`Verdict` says what verifying one entry found: the relative error of what it
served (or would have served), and whether that was acceptable. The strategy hands each to its context
(``record_lookup`` / ``record_verdict``), which passes the same event to the bank (policy bookkeeping: hits,
misses, ``on_error``) and to the stats (per-layer and per-tenant counters), so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Lookup:
    """What a strategy decided about the rows of one call."""

    served: list[tuple[int, float]] = field(default_factory=list)
    """``(entry id, similarity)`` of each entry that served a row."""
    missed: int = 0
    """Rows (lookups) that found nothing they could use."""
    partial: list[float] = field(default_factory=list)
    """For each row of ``served`` that was served in part (a semantic partial hit), the share of its tokens it
    computed: such a hit saves that much less than a whole one."""


@dataclass
class Verdict:
    """What computing a hit anyway showed about the entry that stood for it."""

    entry_id: int | None
    """The entry judged (``None``: no single entry, e.g. an attention head's rows)."""
    error: float
    """Relative error of what it served or would have served."""
    acceptable: bool
    """The strategy's acceptance criterion on it."""
    explored: bool
    """Checked before deciding to serve (``max_error_rate``'s exploration, the attention strategy's row checks);
    else an audit of a hit that was served or about to be (``verify_fraction``)."""
