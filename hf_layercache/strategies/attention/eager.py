"""Eager attention math, as the models' own ``eager_attention_forward`` computes it (GQA heads repeated, softmax in
float32), and the grouped ``weights @ value`` product the cached path serves hits with."""

from __future__ import annotations

import torch
from torch import nn

from .masks import all_true, any_along, any_true


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, L, d) -> (batch, kv_heads * groups, L, d), each KV head repeated for its query heads."""
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def masked_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """``QK^T * scaling`` (soft-capped) with masked positions at the dtype's minimum, as eager attention adds them."""
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        return scores
    return scores.add_(additive_mask(mask, scores.dtype)[..., : key.shape[-2]])


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention's additive one (0 or the dtype's minimum). Adding it, rather than a
    ``masked_fill`` with the boolean mask broadcast over heads, is several times faster on a CPU."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    weights: bool = False,
    masks: FusedMasks | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Softmax attention with what a stored entry needs: the outputs (batch, heads, L, d), the float32
    log-normalisers (batch, heads, L) and, when ``weights`` asks (``output_attentions``), the maps (batch, heads,
    L, L). ``keep`` is the (batch, 1, L, L) boolean mask; ``masks`` its :func:`fused_masks`, when the caller kept
    them (every layer of a request has the same mask).

    On a CPU, without soft-capping or maps, this is the fused kernel sdpa itself dispatches to there, which returns
    the normaliser beside the output without materialising the map (several times cheaper than eager math at long
    lengths); eager math otherwise. A query with nothing to attend to (left padding) gets eager's output either way,
    the mean of the values; its normaliser is meaningless (the cached path recomputes such rows)."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if fused(query, weights, softcap):
        additive, empty = masks if masks is not None else fused_masks(keep, query.dtype)
        if empty is not None:  # eager's uniform row: a zero query over every key (the fused kernel gives NaN)
            query = query.masked_fill(empty, 0.0)
        output, lse = _FUSED_CPU(query, key, value, 0.0, False, attn_mask=additive, scale=scaling)
        return output, lse.float(), None
    scores = masked_scores(query, key, keep, scaling, softcap)
    lse = torch.logsumexp(scores.float(), dim=-1)
    maps = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(maps, value), lse, maps if weights else None


FusedMasks = tuple[torch.Tensor | None, torch.Tensor | None]
"""The fused kernel's additive mask (``None``: every query attends every key) and the queries with nothing to attend
to, (batch, 1, L, 1) (``None``: there are none)."""


def fused(query: torch.Tensor, weights: bool, softcap: float | None) -> bool:
    """Whether :func:`attention_with_lse` runs the fused kernel for such a call."""
    return _FUSED_CPU is not None and query.device.type == "cpu" and not weights and softcap is None


def fused_masks(keep: torch.Tensor, dtype: torch.dtype) -> FusedMasks:
    """What the fused kernel needs of the boolean mask ``keep`` (batch, 1, L, L): see :data:`FusedMasks`. Queries
    with nothing to attend to are let attend every key (with a zero query: eager's uniform row)."""
    empty = ~any_along(keep, -1, keepdim=True)
    if any_true(empty):
        keep = keep | empty
    else:
        empty = None
    return (None if all_true(keep) else additive_mask(keep, dtype)), empty


_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
"""sdpa's CPU kernel, the one op of torch that returns the log-normaliser with the output (``None`` where absent)."""


def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """``softmax(QK^T * scaling + mask)`` as the models' eager functions compute it (softmax in float32)."""
    scores = masked_scores(query, key, mask, scaling, softcap)
    return nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention: what BERT's and Llama's ``eager_attention_forward`` compute (GQA heads repeated)."""
    weights = attention_scores(query, key, mask, scaling, softcap)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, repeat_kv(value, query.shape[1] // value.shape[1]))
    return output.transpose(1, 2).contiguous(), weights


def grouped_matmul(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``weights @ repeat_kv(value)`` for one row, (heads, n, m) @ (kv_heads, m, d) -> (heads, n, d), without
    repeating ``value``: the query heads of one KV head are stacked along the rows instead."""
    heads, rows, _ = weights.shape
    out = torch.matmul(weights.reshape(value.shape[0], -1, weights.shape[-1]), value)
    return out.reshape(heads, rows, -1)
