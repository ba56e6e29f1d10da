"""Strategies: what is cached and how it is reused. Importing this package registers the built-in ones."""

from .attention import AttentionStrategy
from .base import StackStrategy, Strategy
from .exact import ExactStrategy
from .prefix import PrefixStrategy
from .semantic import SemanticStrategy

__all__ = ["AttentionStrategy", "ExactStrategy", "PrefixStrategy", "SemanticStrategy", "StackStrategy", "Strategy"]
