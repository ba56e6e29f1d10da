"""What the cache knows about a model as a whole, as data: its shapes, which heads keep prefix reuse exact, which
attention modules dispatch through transformers' ``AttentionInterface``.

:mod:`hf_layercache.layers` knows the layers (where the stacks are, what a layer returns); this module knows the
rest, so strategies never read configs or model classes themselves. Register more with :func:`register_prefix_heads`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """A model's shapes, from its (text) config; ``None`` where the config does not say."""

    model_type: str | None
    hidden_size: int | None
    attention_heads: int | None
    kv_heads: int | None
    """Key/value heads (fewer than ``attention_heads`` under grouped-query attention)."""
    head_dim: int | None


def model_spec(model: nn.Module) -> ModelSpec:
    """The :class:`ModelSpec` of ``model`` (multimodal models: of their text model)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    return ModelSpec(getattr(config, "model_type", None), hidden, heads, kv_heads, head_dim)


_PREFIX_HEADS: dict[str, tuple[str, ...]] = {
    "llama": ("LlamaModel", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Model", "Qwen2ForCausalLM"),
    "gpt2": ("GPT2Model", "GPT2LMHeadModel"),
}
"""Per model type, the classes whose outputs are per-position functions of the base model's output (tested), so
prefix reuse stays exact. Other heads read ``input_ids`` themselves (sequence classification finds the last token in
them), so they are refused rather than risked."""


def register_prefix_heads(model_type: str, *class_names: str) -> None:
    """Declare classes of ``model_type`` whose outputs are per-position functions of the base model's states."""
    _PREFIX_HEADS[model_type] = tuple(dict.fromkeys((*_PREFIX_HEADS.get(model_type, ()), *class_names)))


def prefix_heads() -> dict[str, tuple[str, ...]]:
    """Model type -> the classes prefix reuse serves exactly."""
    return dict(_PREFIX_HEADS)


_DISPATCHES: dict[type, bool] = {}


def dispatches_attention(module: nn.Module) -> bool:
    """True for modules whose forward calls the function transformers' ``AttentionInterface`` selects (read from the
    class's source once: transformers has no flag for it)."""
    cls = type(module)
    if cls not in _DISPATCHES:
        try:
            _DISPATCHES[cls] = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _DISPATCHES[cls] = False
    return _DISPATCHES[cls]
