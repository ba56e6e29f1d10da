"""Lookup backends: similarity indexes over key vectors. Importing this package registers the built-in ones."""

from .base import Backend
from .exact import ExactBackend

__all__ = ["Backend", "ExactBackend"]
