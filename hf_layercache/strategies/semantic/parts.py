"""What both reuse steps (``state.py`` and ``residual.py``) work with, built once by the strategy."""

from __future__ import annotations

from dataclasses import dataclass

from ...bank import CacheBank
from .run import RecordLookup, RunBuilder
from .search import EntrySearch
from .store import EntryStore
from .verification import Verifier


@dataclass
class ReuseParts:
    """The strategy's collaborators a reuse step serves a layer with."""

    run_builder: RunBuilder
    search: EntrySearch
    verifier: Verifier
    entry_store: EntryStore
    banks: dict[str, CacheBank]
    """The strategy's banks by layer name, filled as it attaches."""
    record_lookup: RecordLookup
