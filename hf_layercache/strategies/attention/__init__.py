"""``attention``: reuse of softmax attention maps across similar requests in prefill (AttnCache, docs/attention.md).

Modules, in the order a request meets them (imports point one way: the strategy builds the others, none imports it):

* ``strategy.py`` — :class:`AttentionStrategy`: the wiring (``attach``) and the request entry point
  (``begin_request``). Every attachment goes through the model's hook registry: the functions' registration, each
  cached attention module's engine (an instance attribute) and the selected implementation.
* ``registration.py`` — the two attachments outside the modules, as apply/undo pairs: the attention and mask
  functions in transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` (one process-wide registration,
  counted per model), and ``set_attn_implementation`` with every config's previous implementation put back.
* ``request_state.py`` — the keys of the per-request state (prefill, maps asked for, namespace, mask patterns).
* ``function.py`` — the registered functions: ``attention_forward`` (a cached module's call to its engine, any other
  to eager math), ``boolean_mask`` (always a real boolean mask: for a name ``AttentionMaskInterface`` does not know,
  models built on ``masking_utils`` would pass no mask at all) and ``default_attention`` (the model's own sdpa).
* ``engine.py`` — :class:`CachedAttention`, one per cached layer: the gate's route, the lookup, hits served as
  ``A @ V`` corrected where states moved, misses computed and stored. Built with everything it uses.
* ``gate.py`` — per layer and length bucket, whether caching beats the model's own attention, as measured.
* ``keys.py`` — the lookup keys (pooled, randomly projected query/key states); ``counters.py`` — how much of the
  stored maps hits reused. One of each per model, shared by the engines.
* ``rows.py`` — one request row against one stored entry: what moved, rescored columns, exact rows;
  ``positions.py`` — sets of positions as runs, and what a row's mask says; ``eager.py`` — the models' own math and
  the fused kernel that returns the normaliser; ``entry.py`` — the typed :class:`AttentionEntry`; ``config.py``.

A request: ``begin_request`` notes whether it is a prefill, whether it asks for the maps and its namespace; the model
runs as usual, and each attention call reaches ``attention_forward``. A cached module's engine, in prefill and when
its gate says to cache, looks every row up: a hit reuses the stored map where the row's query, key and value states
did not move (rows whose query moved are computed, columns whose key or value moved or whose mask differs are
rescored and renormalised with the stored log-normaliser), verified on a few rows per head; a miss computes the
missed rows only and stores them (states, normaliser and output, no map). Decode steps and layers the gate turned
off run the model's previous implementation (sdpa); bypassed requests and modules the strategy does not cache
(cross-attention, unselected layers) run eager math.
"""
