"""Eviction policies. Importing this package registers the built-in ones."""

from .base import Policy, ScoredPolicy
from .cost import CostPolicy
from .divergence import DivergencePolicy
from .fifo import FIFOPolicy
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .staleness import StalenessPolicy

__all__ = [
    "CostPolicy",
    "DivergencePolicy",
    "FIFOPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "Policy",
    "ScoredPolicy",
    "StalenessPolicy",
]
