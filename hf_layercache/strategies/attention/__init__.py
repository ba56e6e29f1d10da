"""``attention``: reuse of softmax attention maps across similar requests in prefill (AttnCache).

How it works, per cached layer:

* The strategy registers one attention function with transformers' ``AttentionInterface`` and, under the same
  name, a mask function with ``AttentionMaskInterface`` (without it, models built on ``masking_utils`` pass no mask
  at all to a custom attention function). It selects them with ``model.set_attn_implementation``. All three go
  through the model's hook registry, so ``disable`` puts the previous implementation back and unregisters the
  functions after the last model.
* Lookup: the layer's query and key states, mean-pooled over a few position segments and randomly projected (fixed
  seed) to ``attention_key_dim`` dimensions, find the nearest stored maps through the configured backend.
* Hit: the stored map ``A`` (all heads) stands in for ``softmax(QK^T)``; only ``A @ V`` is computed, ``Q``/``K``/``V``
  are still projected (a decoder's KV cache stays exact). Per position, the new request's query and key states are
  compared with the stored ones: rows whose query moved are computed exactly, columns whose key moved (or whose mask
  differs) are rescored and their rows renormalised with the stored log-normaliser, so positions that did not move
  are served exactly. A few reused rows are recomputed to verify the result (``attention_verify_rows``,
  ``attention_max_error``); a candidate that fails is a miss.
* Miss: eager attention (the models' own math) for the missed rows only; their maps are stored.

Decode steps (queries shorter than keys) and calls the cached path cannot take compute eagerly, as does every
attention module the strategy does not cache (cross-attention, unselected layers). See docs/attention.md.
"""
