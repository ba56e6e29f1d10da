"""Partial hits: a row that extends a cached entry's tokens at its ends (a greeting put in front, a reference id
appended) takes the entry's states for the entry's tokens and computes its added tokens and the entry's tokens
next to them (``search.RECOMPUTED_NEIGHBOURS``), in every layer, their queries attending to the entry's other keys
and values there and to one another. This is CacheBlend's selective recompute with the added tokens and those their
addition moves most as the selection; serving such a row whole instead invents the added tokens' states
(docs/semantic.md measures both).

A layer computes some tokens of a row without the library knowing its architecture: it is called on those tokens
alone, with a KV-cache argument holding the entry's K/V at that layer (:class:`KVCacheArgument`). The layer's
self-attention appends the computed tokens' K/V to them as it does in incremental decoding, and the mask built here
lets every computed token attend to them all, less the stored K/V of the entry tokens it computes anew. The same
argument, with nothing to prepend, records the K/V a layer computes for the rows that become entries.

A layer qualifies (:func:`supports_partial`) when its forward takes a KV-cache argument and its self-attention is
bidirectional, running eager or sdpa attention (which take a float mask): BERT-like encoders. Elsewhere rows are
served whole or computed, as before.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...kv import CACHE_ARGUMENTS
from ...layers import LayerSpec

_MASK_ATTENTION = ("eager", "sdpa")
"""Attention implementations that take the float mask a partial call builds."""
_PARTIAL_ARGUMENTS = frozenset({"attention_mask", *CACHE_ARGUMENTS})
"""Per-row arguments a partial call rebuilds; any other one holding a tensor (positions, cross-attention inputs)
would have to be cut to the added tokens, which no layer contract says how to do, so such calls serve rows whole."""


class KVCacheArgument:
    """What a layer's self-attention gets as its KV cache in a partial call: ``update`` records the K/V the layer
    computed and returns them after the entries' K/V at this layer, as a cache returns the past and the new together.
    Duck-typed: the attention modules that qualify call ``update`` and nothing else.

    ``buffers``: key and value tensors whose first ``stored`` columns hold the entries' K/V, with room after them for
    the computed ones, which ``update`` writes there (a copy of the few added tokens instead of concatenating the
    whole past every layer). Without them the computed K/V are only recorded (for the entries rows become)."""

    def __init__(self, buffers: tuple[torch.Tensor, torch.Tensor] | None = None, stored: int = 0):
        self.buffers = buffers
        self.stored = stored
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.key, self.value = key_states, value_states
        if self.buffers is None:
            return key_states, value_states
        key, value = self.buffers
        key[:, :, self.stored :].copy_(key_states)
        value[:, :, self.stored :].copy_(value_states)
        return key, value


class RecordingGate:
    """Whether computed rows record their K/V for partial hits: while at least ``share`` of the recent looked-up rows
    found an entry (a moving average over about ``rows`` rows, starting open).

    Recording costs every computed row the bytes of its K/V in every layer. On traffic where nothing repeats (the
    natural stream of docs/benchmarks.md, 0.3% of rows found an entry) that cost 3% of the throughput and bought
    nothing; where rows find entries (the campaign stream, 70%), the next edit of a stored text is what pays. Rows
    stored while the gate is shut are served whole or computed, as without partial hits."""

    def __init__(self, share: float = 0.05, rows: int = 32):
        self.share = share
        self.decay = 1.0 - 1.0 / rows
        self.level = 1.0

    @property
    def open(self) -> bool:
        return self.level >= self.share

    def observe(self, found: int, rows: int) -> None:
        """``found`` of ``rows`` looked-up rows found an entry."""
        kept = self.decay**rows
        self.level = self.level * kept + (found / max(rows, 1)) * (1.0 - kept)


def _self_attention(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if hasattr(m, "is_causal") and hasattr(m, "layer_idx")]


def is_causal(module: nn.Module) -> bool:
    """Whether the layer ``module`` attends causally (a decoder's): each token's state comes from the tokens before
    it, so a token the entry lacks has no state to borrow (see ``EntrySearch``)."""
    return any(m.is_causal is not False for m in _self_attention(module))


def supports_partial(module: nn.Module) -> bool:
    """Whether the layer ``module`` can compute some tokens against stored K/V: a KV-cache parameter, and
    self-attention modules that are all bidirectional (``is_causal`` False) on eager or sdpa attention."""
    parameters = inspect.signature(module.forward).parameters
    if "attention_mask" not in parameters or not any(name in parameters for name in CACHE_ARGUMENTS):
        return False
    attention = _self_attention(module)
    if not attention:
        return False
    for m in attention:
        config = getattr(m, "config", None)
        if m.is_causal is not False or getattr(config, "_attn_implementation", None) not in _MASK_ATTENTION:
            return False
    return True


def plain_call(arguments: dict[str, Any], spec: LayerSpec, hidden: torch.Tensor) -> bool:
    """Whether a call carries no tensor besides its ``hidden`` state and the mask, so its rows' added tokens can be
    computed alone."""
    for name, value in arguments.items():
        if value is hidden or name in _PARTIAL_ARGUMENTS:
            continue
        if name in spec.batch_args and value is not None:
            return False
        if isinstance(value, torch.Tensor):
            return False
    return True


@dataclass
class PartialRow:
    """One row served in part at one layer: where the tokens it computes (its additions and their neighbours) sit in
    the padded batch, and the entry's K/V at this layer, ``(heads, entry tokens, head_dim)`` each."""

    row: int
    computed: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    replaced: torch.Tensor | None = None
    """The entry's positions whose K/V the computed tokens replace: hidden from the computed tokens' attention."""


BIN_STORED_TOKENS = 1024
"""Most entry tokens one call row packs (unless a single entry holds more). Rows served in part add a few tokens
each (8 on average on the campaign stream of docs/benchmarks.md) to entries of about a hundred: with one call row
per batch row, every row's additions were padded to the most any row added (11.1k added tokens computed as 16.8k).
Packing rows' additions into one call row, each attending only to its own entry and additions, removes that padding;
the bound keeps the attention each packed token pays over the call row's keys below the cost of its linear layers
(they match near 2,300 keys on MiniLM). Replaying the stream's 354 partial calls: 1.75 s one row per call row,
1.68 / 1.71 / 1.53 / 1.49 s at 256 / 512 / 1,024 / 2,048 tokens."""


@dataclass
class PartialCall:
    """The computed tokens of several rows as one layer call, packed into call rows (:data:`BIN_STORED_TOKENS`):
    ``hidden`` ``(call rows, most computed, hidden)``; the cache argument holding each call row's entries' K/V; the
    float mask over ``[entries' tokens; computed tokens]`` that lets each row's computed tokens attend to their own
    entry's other tokens and to one another only; and where each planned row's tokens sit, ``(call row, first
    column)``."""

    hidden: torch.Tensor
    cache: KVCacheArgument
    mask: torch.Tensor
    places: list[tuple[int, int]]


def bins(plan: list[PartialRow], most_stored: int) -> list[list[int]]:
    """The plan's rows (indices) in call rows of at most ``most_stored`` entry tokens each, in order, each call row
    taking rows until the next would pass the bound."""
    out: list[list[int]] = []
    stored = 0
    for i, p in enumerate(plan):
        tokens = p.key.shape[1]
        if not out or stored + tokens > most_stored:
            out.append([])
            stored = 0
        out[-1].append(i)
        stored += tokens
    return out


def partial_call(hidden: torch.Tensor, plan: list[PartialRow]) -> PartialCall:
    """Gather the computed tokens of ``plan``'s rows from the batch's ``hidden`` state into one call (see
    :class:`PartialCall`)."""
    packed = bins(plan, BIN_STORED_TOKENS)
    added = [p.computed.numel() for p in plan]
    stored = [p.key.shape[1] for p in plan]
    most_added = max(sum(added[i] for i in rows) for rows in packed)
    most_stored = max(sum(stored[i] for i in rows) for rows in packed)
    heads, head_dim = plan[0].key.shape[0], plan[0].key.shape[2]
    device, dtype = hidden.device, hidden.dtype
    width = most_stored + most_added
    compact = hidden.new_zeros(len(packed), most_added, hidden.shape[-1])
    key = hidden.new_zeros(len(packed), heads, width, head_dim)
    value = hidden.new_zeros(len(packed), heads, width, head_dim)
    mask = torch.full((len(packed), 1, most_added, width), torch.finfo(dtype).min, dtype=dtype, device=device)
    places = [(0, 0)] * len(plan)
    for b, rows in enumerate(packed):
        a0 = s0 = 0
        for i in rows:
            p, a, s = plan[i], added[i], stored[i]
            compact[b, a0 : a0 + a] = hidden[p.row, p.computed.to(device)]
            key[b, :, s0 : s0 + s].copy_(p.key)  # converts from the stored dtype on the way
            value[b, :, s0 : s0 + s].copy_(p.value)
            mask[b, :, a0 : a0 + a, s0 : s0 + s] = 0
            if p.replaced is not None and p.replaced.numel():
                mask[b, :, a0 : a0 + a, s0 + p.replaced.to(device)] = torch.finfo(dtype).min
            mask[b, :, a0 : a0 + a, most_stored + a0 : most_stored + a0 + a] = 0
            places[i] = (b, a0)
            a0, s0 = a0 + a, s0 + s
        if a0 < most_added:  # padding queries attend to themselves: a softmax over something real
            pad = torch.arange(a0, most_added, device=device)
            mask[b, 0, pad, most_stored + pad] = 0
    return PartialCall(compact, KVCacheArgument((key, value), most_stored), mask, places)


def padded_positions(real: slice | torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """Where the ``added`` tokens (positions among a row's real tokens) sit in the padded batch, the row's real
    tokens being at ``real``."""
    if isinstance(real, slice):
        return added + (real.start or 0)
    return real[added]


def row_kv(
    captured: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]], layers: range, row: int
) -> torch.Tensor | None:
    """A row's recorded K/V over ``layers`` (stack positions), ``(layers, 2, heads, tokens, head_dim)`` for its
    entry, in :func:`storage_dtype`; ``None`` when a layer did not record the row."""
    recorded = [captured.get(position, {}).get(row) for position in layers]
    if not recorded or any(kv is None for kv in recorded):
        return None
    key = recorded[0][0]
    out = torch.empty(len(recorded), 2, *key.shape, dtype=storage_dtype(key.dtype), device=key.device)
    for layer, (key, value) in enumerate(recorded):  # one pass: convert and copy together
        out[layer, 0].copy_(key)
        out[layer, 1].copy_(value)
    return out


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """How entries keep K/V: float32 ones as float16. Every computed row records every layer's K/V (13x the bytes
    of its state for a 6-layer model), and the writing cost a natural stream, where nothing is reused, 7-10% of its
    throughput in float32; half the bytes halve that. A partial hit reads them back into the model's dtype: the
    rounding (relative 5e-4) is far inside what serving the entry's states approximates."""
    return torch.float16 if dtype == torch.float32 else dtype
