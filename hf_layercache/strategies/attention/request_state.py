"""Keys of the attention strategy's per-request state (``RequestScope.state``, reset when the request returns).

Why a module of its own: the state is written once per request by the strategy (``begin_request``) and read in every
layer by the engine and the registered functions; naming the keys here lets those modules share them without
importing each other (and without the strategy)."""

from __future__ import annotations

PREFILL = "attention.prefill"
"""Whether the request starts with an empty KV cache: only prefill calls may take the cached path."""
NAMESPACE_KEY = "attention.namespace"
"""The request's namespace tag (:func:`hf_layercache.request.namespace_tag`): entries are stored and found under it."""
WEIGHTS = "attention.weights"
"""Whether the request asked for the attention maps (``output_attentions``)."""
PATTERNS = "attention.patterns"
"""Per mask tensor, the :class:`~.positions.Pattern` of each batch row (:func:`~.positions.request_patterns`)."""
EARLIER = "attention.earlier"
"""Per sequence length, what the last cached layer call of the request found for the gates of the later layers
(``earlier`` of :meth:`~.gate.Gate.route`)."""
FUSED_MASKS = "attention.fused_masks"
"""Per mask tensor, what the fused kernel of a miss needs of it (:func:`~.eager.fused_masks`)."""
