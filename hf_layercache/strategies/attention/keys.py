"""The lookup keys of the attention strategy: what a request row is found by in a layer's bank."""

from __future__ import annotations

import torch
from torch import nn

_PROJECTION_SEED = 0x5EED
"""Seed of the projection matrix: fixed, so every process projects alike and keys saved with a warm cache stay
valid."""


class LookupKeys:
    """(batch, ``dim``) float32 keys of an attention call: its query and key states mean-pooled over ``segments``
    contiguous runs of positions, then projected by a fixed-seed Gaussian matrix.

    Pooling by segment rather than over the whole sequence tells apart inputs whose content sits at other positions;
    the projection makes keys of one size whatever the heads. One instance serves every cached layer of a model, so
    the pooling and projection matrices are built once per length (width), device and dtype."""

    def __init__(self, segments: int, dim: int):
        self.segments = segments
        """``attention_key_segments``"""
        self.dim = dim
        """``attention_key_dim``"""
        self._pools: dict[tuple, torch.Tensor] = {}
        self._projections: dict[tuple, torch.Tensor] = {}

    def __call__(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The keys of ``query`` (batch, heads, L, d) and ``key`` (batch, kv_heads, L, d)."""
        length = query.shape[-2]
        pool = self._pool(length, query.device, query.dtype)
        pooled = torch.cat([_pooled(pool, query), _pooled(pool, key)], dim=1).flatten(1)
        return torch.matmul(pooled, self._projection(pooled.shape[1], query.device, query.dtype)).float()

    def _pool(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(segments, length) matrix averaging contiguous runs of positions."""
        cache_key = (length, device, dtype)
        if cache_key not in self._pools:
            segments = min(self.segments, length)
            owner = torch.arange(length) * segments // length
            pool = nn.functional.one_hot(owner, segments).T.to(torch.float32)
            self._pools[cache_key] = (pool / pool.sum(-1, keepdim=True)).to(device=device, dtype=dtype)
        return self._pools[cache_key]

    def _projection(self, in_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(in_dim, dim) Gaussian matrix, scaled to keep the keys' norms near the pooled states'."""
        cache_key = (in_dim, device, dtype)
        if cache_key not in self._projections:
            generator = torch.Generator().manual_seed(_PROJECTION_SEED)
            matrix = torch.randn(in_dim, self.dim, generator=generator)
            self._projections[cache_key] = (matrix / in_dim**0.5).to(device=device, dtype=dtype)
        return self._projections[cache_key]


def _pooled(pool: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """(segments, L) pooling matrix, (batch, heads, L, d) states -> (batch, heads, segments, d). Over the positions of
    every head at once: the states arrive as a view of the projection's (batch, L, heads, d) output, contiguous that
    way round, so no head is copied out. Where the segments are equal runs (L a multiple of their number, as at
    128 to 1,024 tokens), a mean over a view: one pass over the states instead of a product with the matrix, which
    cost about a millisecond per call at 1,024 tokens on SmolLM2, an eighth of a hit."""
    batch, heads, length, dim = states.shape
    segments = pool.shape[0]
    flat = states.transpose(1, 2).reshape(batch, length, heads * dim)
    if length % segments == 0:
        pooled = flat.view(batch, segments, length // segments, heads * dim).mean(2)
    else:
        pooled = torch.matmul(pool, flat)
    return pooled.view(batch, segments, heads, dim).transpose(1, 2)
