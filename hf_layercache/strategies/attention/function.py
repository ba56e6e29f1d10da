"""The functions registered with transformers under ``ATTN_IMPLEMENTATION``: the attention function, which sends
the modules the strategy caches to their :class:`~.engine.CachedAttention` and every other call to eager math, the
mask function beside it, and the model's own attention (``default_attention``) that the engine runs where the cache
does not. Registering them is :mod:`.registration`'s part."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ...request import RequestScope, current_scope
from .eager import eager_attention
from .request_state import WEIGHTS

ATTN_IMPLEMENTATION = "hf_layercache"
"""The name under which the attention and mask functions are registered with transformers."""

_KNOWN_KWARGS = frozenset(
    {
        "softcap",  # applied
        "sliding_window",  # already in the mask the registered mask function builds
        "is_causal",
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "token_type_ids",
        # what transformers passes down every layer's **kwargs: loss arguments, and packed-sequence boundaries for
        # flash-attention kernels, which the mask already carries for mask-based attention
        "shift_labels",
        "num_items_in_batch",
        "output_router_logits",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_idx",
    }
)
"""Keyword arguments of attention functions that do not change the math beyond the mask. Any other one with a value
(T5's ``position_bias``, gpt-oss's ``s_aux`` sinks) is refused rather than silently ignored."""

MODULE_ATTR = "_layer_cache_attention"
"""Instance attribute of a cached attention module: its :class:`~.engine.CachedAttention`, set by the strategy
through the hook registry. An attribute of the module rather than a lookup table, so a module finds its engine in
one dict read and a module the strategy does not cache (cross-attention, unselected layers) finds none."""
_SKIPPED_MASKS = "attention.sdpa_skipped_masks"
"""Key of the request scope's state: signatures of the masks for which sdpa's own mask function would have returned
``None`` (no padding, plain causal), so the default path can give sdpa what the model would have given it."""


def boolean_mask(*args: Any, **kwargs: Any) -> torch.Tensor:
    """The mask function registered beside the attention: always a ``(batch, 1, q, kv)`` boolean mask (``True``
    attends). It never returns ``None`` (sdpa's shortcut for "causal" or "no padding"), so every call sees the real
    pattern, which the cached path applies to stored maps. When sdpa's mask function would have skipped the mask,
    the request scope remembers it: the default path then calls sdpa exactly as the model does (``None``)."""
    mask = sdpa_mask(*args, **kwargs)  # what the model's own sdpa path gets; the full mask unless it is skipped
    if mask is not None:
        return mask
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    mask = sdpa_mask(*args, **kwargs)
    scope = current_scope()
    if scope is not None:
        scope.state.setdefault(_SKIPPED_MASKS, set()).add(_signature(mask))
    return mask


def _signature(mask: torch.Tensor) -> tuple:
    return mask.data_ptr(), tuple(mask.shape), mask.stride()


def default_attention(
    implementation: str,
    scope: RequestScope,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own attention, as it ran before ``enable()``, for inference calls the cache does not take (decode
    steps, layers the gate turned off): sdpa with the mask sdpa would have had, when that was the implementation and
    neither maps (``output_attentions``) nor soft-capping (which sdpa lacks) are asked for; eager math otherwise."""
    if implementation != "sdpa" or scope.state.get(WEIGHTS, False) or softcap is not None:
        return eager_attention(module, query, key, value, mask, scaling, softcap=softcap)
    if mask is not None and _signature(mask) in scope.state.get(_SKIPPED_MASKS, ()):
        mask = None
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registered attention function: the cached path for modules the strategy caches, eager math otherwise."""
    unsupported = sorted(name for name, value in kwargs.items() if value is not None and name not in _KNOWN_KWARGS)
    if unsupported:
        raise ValueError(
            f"strategy='attention' computes softmax(QK^T * scaling + mask) @ V, but {type(module).__name__} passes "
            f"{unsupported} to its attention function (position biases, attention sinks, ...), which that does not "
            f"model. Allowed extra arguments: {sorted(_KNOWN_KWARGS)}. Use another strategy for this model."
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap = kwargs.pop("softcap", None)
    cached = module.__dict__.get(MODULE_ATTR)
    scope = current_scope()
    if cached is None or scope is None or scope.bypass_reason is not None or module.training or dropout:
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout, softcap)
    return cached(scope, module, query, key, value, attention_mask, scaling, softcap, kwargs)
