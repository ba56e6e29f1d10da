"""``semantic``: approximate reuse of layer work for inputs similar to earlier ones (LLMCache).

Every cached layer has a bank of entries from earlier inputs, found by cosine similarity of a fingerprint key; an
entry is served when the similarity reaches the layer's threshold (``config.threshold_for``). Two forms of reuse:

* ``reuse="residual"``: each layer is keyed on its *own input* (the fingerprint of the hidden state that
  enters it) and an entry holds the layer's update ``out - in`` of an earlier input. A hit adds that update to the
  new input's own state, ``h_l(x) ~= h_{l-1}(x) + [h_l(x') - h_{l-1}(x')]``, as diffusers' First Block Cache does, so
  the new input's information flows on and hit rates genuinely differ by depth.
* ``reuse="state"`` (the paper; the default, as it measured faster at equal or better fidelity): one fingerprint
  per request, from the state entering the first looked-up layer; entries hold an earlier input's layer *output*.
  Serving it throws the new input away, so a row jumps to the deepest layer that hits: the layers before it pass
  the row through, that layer returns the stored state, and the layers after it compute from there (on the earlier
  input's trajectory).

Rules that keep it honest (docs/semantic.md has the measurements):

* Tokens: an entry of another length is used only when the token sequences align (a diff over token ids) with at
  most ``max_unaligned`` of the new tokens lacking a counterpart; requests with a KV cache need equal lengths. A
  threshold of 1.0 or more serves identical token sequences only.
* Only exactly computed rows are stored: a row that was served an approximation never becomes an entry, so errors
  do not feed on themselves. Entries are stored under their namespace (the bank's tenant field) and are never
  served to another one.
* ``verify_fraction`` of hits are checked by computing the layer anyway: the relative error goes to the policy
  (``on_error``) and to ``stats()`` with the ``acceptance`` verdict, and the computed result is served. With
  ``acceptance="argmax"`` the verdict waits for the model's output: entries record the prediction their request got
  (``PREDICTION``), and a verified row is acceptable when its computed prediction is the same.
* ``max_error_rate`` adds a learned, error-bounded decision (:mod:`hf_layercache.verified`): the nearest entry at
  or above the threshold is a candidate, and it is served, or explored (computed and judged, its verdict recorded in
  the entry), as that module's bound says.
* Decoders: reuse happens in prefill only. The K/V a layer writes are recorded with its entry and replayed on a hit,
  so ``generate()`` continues from a consistent cache; with a KV cache a batch is served whole or computed whole,
  and decode steps (a non-empty cache) never look up.
* Layers that return more than their hidden state (T5's position biases) are refused: a hit could not produce them.

Where each part lives: :mod:`.strategy` (the class, its registration, wiring and layer checks), :mod:`.hook` (the
layer hook, which computes rows), :mod:`.run` (what a forward pass knows about its rows), :mod:`.alignment` (token
alignment), :mod:`.search` (finding candidates, drawing the rows to verify), :mod:`.verification` (judging verified
rows, ``acceptance="argmax"``), :mod:`.entries` (the typed :class:`SemanticEntry`, storing, K/V packing),
:mod:`.residual` and :mod:`.state` (the two forms of reuse).
"""
