"""``segment``: position-independent reuse of passages in causal decoders with rotary positions (RAG prompts).

A prompt is cut at ``segment_separator`` into segments. Each segment's key/value states of every layer and its final
hidden states are stored under its own tokens (and the tenant), from the first prompt that computed them. A later
prompt gathers its cached segments wherever they now sit, re-rotates their keys to the new positions
(:mod:`.rope`), recomputes ``segment_recompute`` of the reused tokens (the ones whose states deviate most from this
prompt's at ``segment_probe_layer``, CacheBlend; or each segment's first tokens, EPIC: :mod:`.select`) and computes
the rest (new segments, separators, the last token) in one call of the model's own forward after a cache of the
kept tokens (:mod:`.blend`). The returned cache is in position order, so ``generate`` continues as usual.

Approximate: kept tokens' states saw another context; at ``segment_recompute=1.0`` every call is a full prefill. A
segment at position 0 stored from position 0 is exact and never recomputed.

Where each part lives, dependencies pointing down the list: :mod:`.strategy` (the model gate, the request path,
storing and counting), :mod:`.rows` (which rows are blended, merging rows served one by one), :mod:`.blend` (one
row's gather, probe and call), :mod:`.select`, :mod:`.plan` (``RowPlan``), :mod:`.rope`, :mod:`.segments` (splitting
and digests), :mod:`.entry` (``SegmentEntry``), :mod:`.config` (``SegmentConfig``).
"""
