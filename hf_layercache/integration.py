"""Transformers glue: ``layer_cache=`` in ``from_pretrained`` and ``pipeline``, warm caches in ``save_pretrained``.

:func:`install` (run by ``import hf_layercache``) wraps a few transformers entry points; :func:`uninstall` puts the
originals back. What is wrapped and why:

* ``PreTrainedModel.from_pretrained`` (every Auto and concrete class ends there): takes ``layer_cache=`` before
  the model constructor would reject it, enables the cache, and restores a warm cache found in the directory.
* ``PreTrainedModel.save_pretrained``: writes the warm cache beside the weights, *before* any upload.
* ``from_pretrained`` of the tokenizer, processor and config Auto classes: ``pipeline(model_kwargs=...)`` passes
  the model kwargs to them too; ``layer_cache`` is dropped there so it never lands in a saved tokenizer or config.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import transformers
from transformers import PreTrainedModel

from .config import LayerCacheConfig
from .controller import ATTRIBUTE, LayerCacheController
from .persistence import LayerCacheMismatchError, LayerCacheVersionError, WarmCache, has_cache, open_cache

_KWARG = "layer_cache"
_COMPONENT_LOADERS = (
    "AutoTokenizer",
    "AutoProcessor",
    "AutoFeatureExtractor",
    "AutoImageProcessor",
    "AutoVideoProcessor",
    "AutoConfig",
)
_originals: dict[tuple[object, str], Any] = {}


def enable(model: PreTrainedModel, config: LayerCacheConfig | dict | None = None) -> PreTrainedModel:
    """Give ``model`` a layer cache (``model.layer_cache``) and return the model."""
    if ATTRIBUTE in model.__dict__:
        raise ValueError(f"{type(model).__name__} already has a layer cache; call hf_layercache.disable(model) first.")
    if config is None:
        config = LayerCacheConfig()
    elif isinstance(config, dict):
        config = LayerCacheConfig.from_dict(config)  # the user's own: an unknown key is an error, not a warning
    elif not isinstance(config, LayerCacheConfig):
        raise ValueError(f"layer_cache must be a LayerCacheConfig or a dict, got {type(config).__name__}.")
    controller = LayerCacheController(model, config)
    controller.attach()
    return model


def disable(model: PreTrainedModel) -> PreTrainedModel:
    """Remove every hook and the ``layer_cache`` attribute; the model computes exactly as before ``enable``."""
    controller = model.__dict__.get(ATTRIBUTE)
    if controller is not None:
        controller.detach()
    return model


# --- wrapped entry points -------------------------------------------------------------------------------------------
def _from_pretrained(cls, pretrained_model_name_or_path, *args, layer_cache=None, **kwargs):
    if isinstance(layer_cache, dict):  # checked before the weights load: a misspelt key fails in milliseconds
        layer_cache = LayerCacheConfig.from_dict(layer_cache)
    loaded = _originals[(PreTrainedModel, "from_pretrained")].__func__(
        cls, pretrained_model_name_or_path, *args, **kwargs
    )
    model = loaded[0] if kwargs.get("output_loading_info") else loaded  # (model, loading_info)
    path = pretrained_model_name_or_path
    explicit = layer_cache is not None
    warm, saved_config = _open_warm_cache(path)
    if not explicit and saved_config is not None:
        layer_cache = LayerCacheConfig.from_dict(saved_config, strict=False)  # perhaps from a newer version
    if layer_cache is None:
        return loaded
    try:
        enable(model, layer_cache)
    except ValueError as err:
        if explicit:
            raise
        # the saved strategy refuses this class (a prefix cache loaded into a sequence-classification head)
        warnings.warn(f"{path} holds a warm cache this model cannot use: {err} The model loads uncached.", stacklevel=2)
        return loaded
    if warm is not None:
        _restore_warm_cache(model, warm, explicit)
    return loaded


def _open_warm_cache(path: Any) -> tuple[WarmCache | None, dict[str, Any] | None]:
    """The warm cache saved beside the weights in ``path`` and its config, read once; ``(None, None)`` without
    one. A cache of another format version cannot be read: a warning, and its config to start the same cache cold."""
    if not (isinstance(path, str | os.PathLike) and os.path.isdir(path) and has_cache(path)):
        return None, None
    try:
        warm = open_cache(path)
    except LayerCacheVersionError as err:
        warnings.warn(f"{err} The model loads, starting cold with an empty cache; save it again.", stacklevel=3)
        return None, err.saved_config
    return warm, warm.header["config"]


def _restore_warm_cache(model: PreTrainedModel, warm: WarmCache, explicit: bool) -> None:
    """Load the warm cache saved beside the weights. One that does not fit this model (other weights, dtype, head or
    strategy) is an error when the caller asked for a cache with ``layer_cache=``, else a warning and a cold start:
    loading a saved model as something else (``dtype=torch.float16``, another head) must still load the model."""
    try:
        model.layer_cache.load(warm)
    except LayerCacheMismatchError as err:
        if explicit and model.layer_cache.config.strategy == warm.header["config"].get("strategy"):
            raise
        warnings.warn(f"{err} The model loads, starting cold with an empty cache.", stacklevel=3)


def _save_pretrained(self, save_directory, *args, **kwargs):
    controller = self.__dict__.get(ATTRIBUTE)
    original = _originals[(PreTrainedModel, "save_pretrained")]
    if controller is None:
        return original(self, save_directory, *args, **kwargs)
    push_to_hub = kwargs.pop("push_to_hub", False)
    result = original(self, save_directory, *args, **kwargs)
    controller.save(save_directory)
    if push_to_hub:
        # transformers uploads only what exists when it uploads: push through push_to_hub, which saves again.
        self.push_to_hub(kwargs.get("repo_id", Path(save_directory).name), **kwargs.get("hub_kwargs", {}))
    return result


def _dropping_layer_cache(original):
    def from_pretrained(cls, *args, **kwargs):
        if not kwargs.get("return_unused_kwargs"):  # AutoConfig hands unused kwargs on to the model: keep it then
            kwargs.pop(_KWARG, None)
        return original.__func__(cls, *args, **kwargs)

    return classmethod(from_pretrained)


def install() -> None:
    """Teach transformers the ``layer_cache=`` argument. Idempotent; undone by :func:`uninstall`."""
    if _originals:
        return
    for name, replacement in (
        ("from_pretrained", classmethod(_from_pretrained)),
        ("save_pretrained", _save_pretrained),
    ):
        _originals[(PreTrainedModel, name)] = PreTrainedModel.__dict__[name]
        setattr(PreTrainedModel, name, replacement)
    for loader_name in _COMPONENT_LOADERS:
        loader = getattr(transformers, loader_name, None)
        if loader is not None and "from_pretrained" in loader.__dict__:
            _originals[(loader, "from_pretrained")] = loader.__dict__["from_pretrained"]
            loader.from_pretrained = _dropping_layer_cache(loader.__dict__["from_pretrained"])


def uninstall() -> None:
    """Restore every wrapped transformers entry point. Models already cached keep their caches."""
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()


def is_installed() -> bool:
    return bool(_originals)
