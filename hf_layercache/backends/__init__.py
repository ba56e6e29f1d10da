"""Lookup backends: similarity indexes over key vectors. Importing this package registers the built-in ones.

``faiss`` and ``annoy`` are registered only when their libraries import (``pip install hf-layercache[faiss]`` or
``[annoy]``); ``exact`` and ``auto`` are always there.
"""

import importlib

from .auto import AutoBackend
from .base import Backend
from .exact import ExactBackend


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


__all__ = ["AutoBackend", "Backend", "ExactBackend"]

if _importable("faiss"):
    from .faiss import FaissBackend

    __all__ += ["FaissBackend"]

if _importable("annoy"):
    from .annoy import AnnoyBackend

    __all__ += ["AnnoyBackend"]
