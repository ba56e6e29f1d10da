"""hf_layercache: layer-wise reuse of work across requests for Hugging Face Transformers.

``import hf_layercache`` registers the built-in strategies, backends, policies and fingerprints and teaches
``from_pretrained`` / ``pipeline`` the ``layer_cache=`` argument (undo with :func:`uninstall`).

One importer gets less: the ``hf-layercache`` command (:mod:`hf_layercache_cli`, outside this package) imports it
while parsing its arguments, and gets only the torch-free part (the config, the registries, ``__version__``) so that
``--help`` or ``inspect`` need not import torch and transformers. The command completes the import before any
subcommand that uses the library (``hf_layercache.cli.common.library``).
"""

import sys

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

_partial = getattr(sys.modules.get("hf_layercache_cli"), "importing_command_line", False)
"""True when the ``hf-layercache`` command imported the package for its argument parser only (see above)."""

if not _partial:
    from . import backends, policies  # noqa: F401  (registers the built-in classes)
    from .bank import CacheBank
    from .calibration import calibrate
    from .controller import LayerCacheController
    from .foreign_hooks import value_neutral_hook
    from .integration import disable, enable, install, uninstall
    from .layers import LayerSpec, register_layer_spec
    from .models import ModelSpec, register_prefix_heads
    from .persistence import LayerCacheFileError, LayerCacheIntegrityError, LayerCacheMismatchError
    from .strategies.attention import strategy as _attention  # noqa: F401  (each registers its strategy)
    from .strategies.exact import strategy as _exact  # noqa: F401
    from .strategies.prefix import strategy as _prefix  # noqa: F401
    from .strategies.segment import strategy as _segment  # noqa: F401
    from .strategies.semantic import strategy as _semantic  # noqa: F401

    install()

__all__ = [
    "CacheBank",
    "LayerCacheConfig",
    "LayerCacheController",
    "LayerCacheFileError",
    "LayerCacheIntegrityError",
    "LayerCacheMismatchError",
    "LayerSpec",
    "ModelSpec",
    "available_backends",
    "available_fingerprints",
    "available_policies",
    "available_strategies",
    "calibrate",
    "disable",
    "enable",
    "get_backend",
    "get_fingerprint",
    "get_policy",
    "get_strategy",
    "install",
    "register_backend",
    "register_fingerprint",
    "register_layer_spec",
    "register_policy",
    "register_prefix_heads",
    "register_strategy",
    "uninstall",
    "value_neutral_hook",
]
