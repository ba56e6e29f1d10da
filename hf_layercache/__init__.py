"""hf_layercache: layer-wise reuse of work across requests for Hugging Face Transformers.

``import hf_layercache`` registers the built-in strategies, backends, policies and fingerprints and teaches
``from_pretrained`` / ``pipeline`` the ``layer_cache=`` argument (undo with :func:`uninstall`).
"""

from . import backends, policies  # noqa: F401  (registers the built-in classes)
from .config import LayerCacheConfig
from .registry import (
    available_backends,
    available_fingerprints,
    available_policies,
    available_strategies,
    get_backend,
    get_fingerprint,
    get_policy,
    get_strategy,
    register_backend,
    register_fingerprint,
    register_policy,
    register_strategy,
)

__version__ = "0.1.0"

__all__ = [
    "LayerCacheConfig",
    "available_backends",
    "available_fingerprints",
    "available_policies",
    "available_strategies",
    "get_backend",
    "get_fingerprint",
    "get_policy",
    "get_strategy",
    "register_backend",
    "register_fingerprint",
    "register_policy",
    "register_strategy",
]
