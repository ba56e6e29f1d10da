"""Eviction policies. Importing this package registers the built-in ones."""

from .base import Policy
from .lru import LRUPolicy

__all__ = ["LRUPolicy", "Policy"]
