"""The exact strategy's config: no fields of its own (torch-free: the command line's ``inspect`` reads it)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import StrategyConfig


@dataclass
class ExactConfig(StrategyConfig):
    """``strategy="exact"``: lossless reuse of identical requests; it reads the common fields below only."""

    reads = ("shared_store", "shared_store_kwargs", "verify_fraction")
