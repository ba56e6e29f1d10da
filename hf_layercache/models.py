"""What the cache knows about a model as a whole, as data: its shapes, which heads keep prefix reuse exact, which
attention modules dispatch through transformers' ``AttentionInterface``.

:mod:`hf_layercache.layers` knows the layers (where the stacks are, what a layer returns); this module knows the
rest, so strategies never read configs or model classes themselves. Register more with :func:`register_prefix_heads`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


_PREFIX_HEADS: dict[str, tuple[str, ...]] = {}
"""Per model type, classes declared prefix-safe beyond the ones every model type gets (:func:`prefix_heads`)."""


def register_prefix_heads(model_type: str, *class_names: str) -> None:
    """Declare classes of ``model_type`` whose outputs are per-position functions of the base model's states."""
    _PREFIX_HEADS[model_type] = tuple(dict.fromkeys((*_PREFIX_HEADS.get(model_type, ()), *class_names)))


def prefix_heads(model_type: str | None) -> tuple[str, ...]:
    """The classes of ``model_type`` prefix reuse serves exactly: its base model and its causal-LM head (as
    transformers' auto mappings name them: the head maps each position's final state to that position's logits),
    and any registered. Other heads may read ``input_ids`` themselves (sequence classification finds the last token
    in them), so they are refused rather than risked."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    names = (MODEL_MAPPING_NAMES.get(model_type), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type))
    return tuple(dict.fromkeys([*(n for n in names if isinstance(n, str)), *_PREFIX_HEADS.get(model_type, ())]))


@dataclass(frozen=True)
class PrefixSupport:
    """What prefix reuse may do with a model: the widest call (pad columns included) whose cached states are the
    states the same tokens get in any other call, and why there is a limit."""

    max_length: int | None = None
    """``None``: no limit. Wider calls are computed whole (counted as bypassed)."""
    reason: str = ""


PrefixCheck = Callable[[nn.Module, nn.Module], "str | PrefixSupport | None"]
"""``check(model, base_model)``: a refusal (the reason, a sentence), a limit, or ``None`` (no objection)."""

_PREFIX_CHECKS: dict[str, PrefixCheck] = {}


def register_prefix_check(name: str, check: PrefixCheck) -> None:
    """Add (or replace) a capability prefix reuse needs of a model; see :data:`PrefixCheck`."""
    _PREFIX_CHECKS[name] = check


def prefix_support(model: nn.Module, base: nn.Module) -> PrefixSupport:
    """Whether ``strategy="prefix"`` can serve ``model`` (whose layer stack ``base`` runs) exactly, by capability:
    a causal decoder whose head works per position, positions from ``position_ids``, a ``DynamicCache`` of
    full-attention layers (sliding-window layers: while a call fits the window), rotary frequencies that do not
    depend on the call's length (or calls short enough that they do not change). ``ValueError`` with the first
    refusal's reason otherwise."""
    limits = []
    for check in _PREFIX_CHECKS.values():
        verdict = check(model, base)
        if isinstance(verdict, str):
            raise ValueError(verdict)
        if verdict is not None and verdict.max_length is not None:
            limits.append(verdict)
    return min(limits, key=lambda limit: limit.max_length, default=PrefixSupport())


def _text_config(module: nn.Module) -> Any:
    config = getattr(module, "config", None)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _check_decoder(model: nn.Module, base: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(_text_config(base), "add_cross_attention", False):
        return (
            f"{type(model).__name__} is an encoder-decoder or has cross-attention: its states depend on more than "
            "the prefix."
        )
    attention = [m for m in base.modules() if hasattr(m, "is_causal")]
    if not attention or not all(m.is_causal is True for m in attention):
        return (
            f"{type(model).__name__} is not a causal decoder (its attention modules are not all causal): a token's "
            "states depend on the tokens after it too."
        )
    return None


def _check_head(model: nn.Module, base: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    allowed = prefix_heads(model_type)
    if type(model).__name__ in allowed:
        return None
    return (
        f"{type(model).__name__} (model_type {model_type!r}) is not a causal-LM head or base model prefix reuse "
        f"serves exactly ({', '.join(allowed) or 'none for this model type'}): its head may read input_ids, which "
        "prefix reuse shortens (declare safe ones with register_prefix_heads)."
    )


def _check_positions(model: nn.Module, base: nn.Module) -> str | None:
    if "position_ids" in inspect.signature(base.forward).parameters:
        return None
    return f"{type(base).__name__} takes no position_ids, so the positions of a continued prefix cannot be given."


_LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})
"""Rotary scalings whose frequencies change with the length of the call (NTK-dynamic, Phi-3's LongRoPE)."""


def _check_cache_layers(model: nn.Module, base: nn.Module) -> str | PrefixSupport | None:
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(_text_config(base))
    other = sorted({t for t in types if t not in ("full_attention", "sliding_attention", "chunked_attention")})
    if other:
        return f"{type(model).__name__} has {', '.join(other)} layers, whose cache holds no per-token key/value states."
    windows = [kw["sliding_window"] for t, kw in zip(types, kwargs, strict=True) if t != "full_attention"]
    if not windows:
        return None
    window = min(windows)
    reason = (
        f"{type(model).__name__} has sliding-window layers of {window} tokens; while a call is shorter than the "
        "window they attend to everything, as full attention does"
    )
    return PrefixSupport(window - 1, reason)  # a sliding cache layer keeps the last window - 1 tokens


def _check_rope(model: nn.Module, base: nn.Module) -> PrefixSupport | None:
    config = _text_config(base)
    parameters = getattr(config, "rope_parameters", None) or {}
    nested = [v for v in parameters.values() if isinstance(v, dict)]
    types = {p.get("rope_type") for p in (nested or [parameters])}
    if not types & _LENGTH_DEPENDENT_ROPE:
        return None
    original = getattr(config, "original_max_position_embeddings", None) or next(
        (
            p["original_max_position_embeddings"]
            for p in (nested or [parameters])
            if p.get("original_max_position_embeddings")
        ),
        getattr(config, "max_position_embeddings", None),
    )
    scalings = ", ".join(sorted(types & _LENGTH_DEPENDENT_ROPE))
    name = type(model).__name__
    reason = f"{name} scales its rotary frequencies by the call's length ({scalings}) beyond {original} positions"
    return PrefixSupport(original, reason)


for _name, _check in (
    ("decoder", _check_decoder),
    ("head", _check_head),
    ("positions", _check_positions),
    ("cache layers", _check_cache_layers),
    ("rotary scaling", _check_rope),
):
    register_prefix_check(_name, _check)


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
