"""Eager attention math, as the models' own ``eager_attention_forward`` computes it (GQA heads repeated, softmax in
float32), and the grouped ``weights @ value`` product the cached path serves hits with."""

from __future__ import annotations

import torch
from torch import nn


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
    return scores.add_(_additive(mask, scores.dtype)[..., : key.shape[-2]])


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention's additive one (0 or the dtype's minimum). Adding it, rather than a
    ``masked_fill`` with the boolean mask broadcast over heads, is several times faster on a CPU."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def key_major_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention's scores and softmax weights, both key-major: (batch, heads, L_key, L_query), the transpose
    of ``masked_scores`` and ``attention_scores``, computed in that layout (the attention strategy stores maps
    key-major, and transposing a map costs more than computing it so)."""
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(key, query.transpose(-1, -2)).mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores.add_(_additive(mask, scores.dtype).transpose(-1, -2))
    return scores, nn.functional.softmax(scores, dim=-2, dtype=torch.float32).to(query.dtype)


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
