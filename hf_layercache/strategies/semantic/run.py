"""Runs: what one forward pass knows about one layer stack (its rows, tokens, digests, keys), and the
:class:`RunBuilder` that opens one per call.

Also the per-row choices the pass makes (a :class:`Candidate` entry, and for state reuse the :class:`Target` layer),
:class:`LayerSlot`, what the reuse steps know of the cached layer they serve, and the callables the steps are handed
(:data:`Compute`, :data:`RecordLookup`). Nothing here knows the steps, so every other module may import it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ...bank import CacheBank
from ...events import Lookup
from ...fingerprints import Fingerprint
from ...kv import CACHE_ARGUMENTS, KVWrite, find_cache, past_length
from ...layers import CachedLayer, flat_tensors
from ...request import RequestScope, namespace_tag
from .alignment import Index
from .entries import SemanticEntry
from .partial import PartialRow

_REQUEST = "semantic.request"
"""Where :meth:`RunBuilder.begin_request` keeps what the stacks' runs need of the request (:class:`_Request`)."""
_ACCOUNTED = frozenset(
    {
        "input_ids",
        "inputs_embeds",
        "attention_mask",
        "position_ids",
        "token_type_ids",
        "cache_position",
        "labels",
        "logits_to_keep",
        *CACHE_ARGUMENTS,  # a KV cache: decode steps do not look up (``start_run``)
    }
)
"""Request arguments whose tensors a run accounts for: the tokens and their types, the mask, where the tokens sit,
and what only a head reads. A call with any other tensor (an image's pixels, states to cross-attend to) computes:
it changes what the layers compute in a way no token id shows."""
TOKEN_TYPE_STRIDE = 1 << 32
"""A row's tokens are ``id + type * TOKEN_TYPE_STRIDE`` (see :func:`_typed_tokens`)."""


@dataclass(frozen=True)
class _Request:
    input_ids: torch.Tensor | None
    mask: torch.Tensor | None
    position_ids: Any
    tokens: torch.Tensor | None
    """The token ids with their types folded in (:func:`_typed_tokens`): what rows are digested and aligned on."""
    accounted: bool
    """Whether the run accounts for every tensor the call passes (:data:`_ACCOUNTED`)."""


def _typed_tokens(input_ids: Any, token_types: Any) -> torch.Tensor | None:
    """Token ids with their token types folded in, ``id + type * TOKEN_TYPE_STRIDE``, or ``None`` when the types do
    not fit the ids. BERT adds a type embedding to every token, so the same ids with other types compute other
    states (a cross-encoder's pair); type 0 everywhere (single texts) leaves the ids as they are, and so the entries
    and keys of such traffic."""
    if not isinstance(input_ids, torch.Tensor) or not isinstance(token_types, torch.Tensor):
        return input_ids if isinstance(input_ids, torch.Tensor) else None
    batch, length = input_ids.shape[0], input_ids.shape[-1]
    if tuple(token_types.shape) not in ((1, length), (batch, length)):
        return None
    if not bool(token_types.any()):
        return input_ids
    return input_ids + token_types.to(input_ids.device, torch.long).expand_as(input_ids) * TOKEN_TYPE_STRIDE


def _positions(real: torch.Tensor) -> Index:
    """Where a row's real tokens are: a slice for the usual right or left padding, else their indices."""
    where = real.nonzero().squeeze(1)
    if where.numel() and int(where[-1] - where[0]) + 1 == where.numel():
        return slice(int(where[0]), int(where[-1]) + 1)
    return where


def _at_start(positions: list[Index], lengths: list[int], position_ids: Any, width: int) -> list[bool]:
    """Per row, whether its real tokens compute at positions ``0 .. n-1``, as every entry's did.

    A model with absolute position embeddings (BERT, GPT-2) computes other states for the same tokens elsewhere: on
    all-MiniLM-L6-v2 a short text left-padded by a dozen columns came out at cosine 0.55 of the same text unpadded,
    so an entry must not serve it, nor it become an entry. The positions are ``position_ids`` where the call passes
    them (``generate()`` numbers each row's real tokens from 0 whatever the padding), else the columns; position ids
    of another shape (several rotary sections) place no row."""
    if position_ids is None:
        return [isinstance(p, slice) and (p.start or 0) == 0 for p in positions]
    if not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) not in (
        (1, width),
        (len(positions), width),
    ):
        return [False] * len(positions)
    ids = position_ids.cpu()
    rows = ids if ids.shape[0] == len(positions) else ids.expand(len(positions), -1)
    return [
        torch.equal(row[where], torch.arange(length, dtype=row.dtype))
        for row, where, length in zip(rows, positions, lengths, strict=True)
    ]


def _twins(digests: list[bytes], real: torch.Tensor) -> dict[int, int]:
    """Rows whose digest (their real tokens) and mask repeat an earlier row's, by that row."""
    first: dict[tuple[bytes, bytes], int] = {}
    twins = {}
    for row, digest in enumerate(digests):
        seen = first.setdefault((digest, real[row].numpy().tobytes()), row)
        if seen != row:
            twins[row] = seen
    return twins


@dataclass(frozen=True)
class LayerSlot:
    """A cached layer as the reuse steps see it: which layer, where in its stack, and its rank among all cached
    layers (for ``threshold_for``)."""

    layer: CachedLayer
    position: int
    rank: int
    partial: bool = False
    """Whether the layer can compute some tokens of a row against stored K/V (:func:`.partial.supports_partial`)."""
    causal: bool = False
    """Whether the layer attends causally (:func:`.partial.is_causal`): only rows whose every token has its
    counterpart in the entry, position for position, are served there."""


class Compute(Protocol):
    """Runs the layer for one call of it; the hook builds one per call, so the steps compute without knowing it."""

    def __call__(self, rows: list[int]) -> tuple[torch.Tensor, list[KVWrite]]:
        """Run the layer on ``rows``: the full-batch output (the input kept in the other rows) and the K/V writes it
        made."""

    def tokens(self, plan: list[PartialRow]) -> list[torch.Tensor]:
        """Run the layer on the tokens ``plan``'s rows compute against their entries' K/V: each row's output at
        those tokens."""


RecordLookup = Callable[[Lookup, CacheBank | None, list[str]], None]
"""``StrategyContext.record_lookup``: what a lookup decided, once, for the bank's policy and the layers' stats."""


@dataclass
class Candidate:
    """An entry chosen for one row: its id, the entry and how its tokens map onto the row's."""

    entry_id: int
    bank: str
    entry: SemanticEntry
    index: Index
    score: float
    explore: bool = False
    """``max_error_rate`` could not vouch for it: computed, judged, and the verdict recorded."""
    audit: bool = False
    """Drawn by ``verify_fraction``: computed and judged, although it would have been served."""
    computed: torch.Tensor | None = None
    """A partial hit (:mod:`.partial`): the positions, among the row's real tokens, of the tokens it adds to the
    entry's and of the entry's tokens next to them, which every layer up to the target computes; ``None``: the row
    is served whole."""
    replaced: torch.Tensor | None = None
    """A partial hit: the entry's positions of the entry tokens it computes (next to its additions), whose stored
    K/V the computed ones replace."""

    @property
    def verify(self) -> bool:
        """Whether the row computes this layer instead of being served."""
        return self.explore or self.audit


@dataclass
class Target:
    """State reuse: the deepest layer (stack position) a row jumps to, and the entry served there."""

    position: int
    candidate: Candidate


@dataclass
class SemanticRun:
    """What one forward pass knows about one layer stack."""

    tokens: list[list[int] | None]
    """Real token ids of each row (``None`` for rows given as embeddings)."""
    positions: list[Index]
    """Where each row's real tokens sit in the padded batch."""
    lengths: list[int]
    digests: list[bytes]
    """Per row: a digest of the namespace, hidden size and real tokens (random for a row given as embeddings), so
    identical inputs share one entry in each layer's bank, and a row's entries in all banks share one digest."""
    input_ids: torch.Tensor | None
    mask: torch.Tensor
    key_mask: torch.Tensor | None
    """The mask fingerprints see: ``None`` when every token is real (a cheaper plain mean)."""
    namespace: int
    with_kv: bool
    exact: list[bool]
    """Rows whose state so far was computed, not served: only they become entries."""
    at_start: list[bool]
    """Rows whose real tokens compute at positions ``0 .. n-1`` (see :func:`_at_start`): only they find entries or
    become ones."""
    keys: torch.Tensor | None = None
    token_tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per row, its real token ids as the tensor every entry made from it copies, built once per request."""
    targets: dict[int, Target] = field(default_factory=dict)
    pending: list[tuple[int, Candidate, float]] = field(default_factory=list)
    """``acceptance="argmax"``: verified rows, their candidates and relative errors, judged once the model's output
    is known."""
    alignments: dict[tuple[int, bytes, float], Index | None] = field(default_factory=dict)
    """Per row, entry tokens and bound on unaligned tokens: the alignment found, computed once per run."""
    twins: dict[int, int] = field(default_factory=dict)
    """Rows repeating an earlier row of the batch (same tokens in the same places), by the row they repeat: a layer
    that computes both computes the first and copies it (see ``SemanticLayerHook.compute``)."""
    partial: bool = False
    """Whether rows may be served in part (:mod:`.partial`): every layer of the stack can, the call carries nothing
    per token but its hidden state and mask, there is no KV cache, and ``max_added`` allows it."""
    record_kv: bool = False
    """With ``partial``, whether computed rows record their K/V (``captured``) for the entries they become
    (:class:`~.partial.RecordingGate`)."""
    captured: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    """With ``record_kv``: per stack position, the keys and values a layer computed for each row it computed, at
    the row's real tokens, ``(heads, tokens, head_dim)`` each."""

    @property
    def batch(self) -> int:
        return len(self.tokens)


class RunBuilder:
    """Opens a stack's run for each call and computes the rows' fingerprint keys.

    The fingerprint decides whether a call can be keyed at all (a token fingerprint needs token ids) and, when it
    reads no hidden state, keys the rows once per run instead of once per layer.
    """

    def __init__(self, fingerprint: Fingerprint):
        self.fingerprint = fingerprint

    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:
        """Keep what the stacks' runs need of the request: a stack's first layer sees only its hidden state."""
        input_ids, token_types = arguments.get("input_ids"), arguments.get("token_type_ids")
        tokens = _typed_tokens(input_ids, token_types)
        unaccounted = any(flat_tensors(v) for k, v in arguments.items() if k not in _ACCOUNTED)
        scope.state[_REQUEST] = _Request(
            input_ids,
            arguments.get("attention_mask"),
            arguments.get("position_ids"),
            tokens,
            accounted=not unaccounted and (tokens is not None or input_ids is None),
        )

    def start_run(
        self, scope: RequestScope, layer: CachedLayer, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> SemanticRun | None:
        """What this call knows about its rows; ``None`` when it cannot use the cache (a decode step, shapes that
        do not fit, a token fingerprint without token ids)."""
        request: _Request = scope.state.get(_REQUEST) or _Request(None, None, None, None, accounted=True)
        if not request.accounted:
            return None
        input_ids, mask, position_ids = request.input_ids, request.mask, request.position_ids
        cache = find_cache(arguments)
        if hidden.dim() != 3 or hidden.shape[0] == 0 or past_length(cache) > 0:
            return None  # an empty batch has nothing to look up: it runs as the model runs it
        batch, length = hidden.shape[:2]
        if input_ids is not None and tuple(input_ids.shape) != (batch, length):
            return None
        if input_ids is None and not self.fingerprint.uses_embeddings:
            return None
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
            return None
        real = mask.bool().cpu()
        positions = [_positions(row) for row in real]
        lengths = [int(row.sum()) for row in real]
        tokens: list[list[int] | None] = [None] * batch
        if request.tokens is not None:
            tokens = [ids[r].tolist() for ids, r in zip(request.tokens.cpu(), real, strict=True)]
        run = SemanticRun(
            tokens=tokens,
            positions=positions,
            lengths=lengths,
            digests=[self._digest(scope.namespace, t, hidden.shape[-1]) for t in tokens],
            input_ids=input_ids,
            mask=mask,
            key_mask=None if bool(real.all()) else mask,
            namespace=namespace_tag(scope.namespace),
            with_kv=cache is not None and arguments.get("use_cache", True) is not False,
            exact=[True] * batch,
            at_start=_at_start(positions, lengths, position_ids, length),
        )
        if not self.fingerprint.uses_embeddings:
            run.keys = self.fingerprint(input_ids, run.key_mask, hidden).float()
        if not run.with_kv:  # a cache's K/V are written by computing every row together
            run.twins = _twins(run.digests, real)
        return run

    @staticmethod
    def _digest(namespace: str, tokens: list[int] | None, hidden_size: int) -> bytes:
        # a JSON array delimits itself, so no namespace string can spell the start of another tenant's tokens
        h = hashlib.blake2b(json.dumps(["hf_layercache.semantic", namespace, hidden_size]).encode(), digest_size=32)
        # rows given as embeddings have no identity to share with other requests
        h.update(os.urandom(16) if tokens is None else torch.tensor(tokens, dtype=torch.long).numpy().tobytes())
        return h.digest()

    def key(self, run: SemanticRun, hidden: torch.Tensor) -> torch.Tensor:
        """The rows' keys at a layer whose input is ``hidden`` (a fingerprint of token ids alone keyed the run)."""
        if not self.fingerprint.uses_embeddings:
            return run.keys
        return self.fingerprint(run.input_ids, run.key_mask, hidden).float()
