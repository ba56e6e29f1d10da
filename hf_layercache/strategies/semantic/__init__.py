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

* Tokens: an entry is served only when the row's tokens align with its own (``edits``). By default
  (``"additive"``) every token of the entry must be in the row, in order, with the row's own tokens at its ends
  only (a greeting, a reference id) and at most ``max_unaligned`` of them; a word changed, dropped or inserted inside
  the text computes, as one word can reverse its meaning. ``edits="any"`` also serves changed tokens their
  counterparts' states. Requests with a KV cache need equal lengths. A threshold of 1.0 or more serves identical
  token sequences only.
* Partial hits (``max_added``): where the layers can compute some tokens against stored keys and values
  (bidirectional encoders, :mod:`.partial`), a row that adds tokens to an entry's takes the entry's states for the
  entry's tokens and computes the added ones in every layer up to its target; entries keep their K/V for that
  while rows find entries (:class:`~.partial.RecordingGate`).
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

The request path (every entry point is in :mod:`.strategy`, each delegating to a collaborator):
``SemanticStrategy.begin_request`` keeps the token ids and mask (:class:`~.run.RunBuilder`); in the model's forward,
each stack's first cached layer calls ``start_run``, which opens the stack's :class:`~.run.SemanticRun` (rows, digests,
keys); every layer's :class:`~.hook.SemanticLayerHook` hands the run to its reuse step (:class:`~.state.StateStep` or
:class:`~.residual.ResidualStep`), which finds candidates (:class:`~.search.EntrySearch`), computes the rows it does
not serve through the hook, judges the verified ones (:class:`~.verification.Verifier`) and stores the exact ones
(:class:`~.store.EntryStore`); ``forward_request`` runs the model and, with ``acceptance="argmax"``, has the verifier
judge the verified rows by its output.

Where each part lives (imports point down this list, never up):

* :mod:`.strategy`: the class, its registration, the request entry points, layer checks, and the wiring: it builds
  every collaborator with what it needs and hands the steps to the hooks.
* :mod:`.hook`: the layer hook, which runs its step and computes the rows the step asks for (sub-batches, K/V writes,
  counters); it knows no strategy.
* :mod:`.state` and :mod:`.residual`: the two reuse steps, one object per strategy serving every looked-up layer.
* :mod:`.verification`: judging verified rows, by cosine or by prediction (``acceptance="argmax"``).
* :mod:`.search`: the nearest usable entry per row, the draws of rows to verify, the similarity tolerance.
* :mod:`.store`: storing computed rows as entries, and placing stored K/V back into a batch.
* :mod:`.run`: what a forward pass knows about its rows, the builder that opens it, the per-row choices.
* :mod:`.partial`: partial hits, computing a row's added tokens alone against an entry's K/V through the layer's
  own KV-cache argument.
* :mod:`.entries`: the typed :class:`~.entries.SemanticEntry`.
* :mod:`.alignment`: token alignment. :mod:`.config`: the strategy's config fields (torch-free).
"""
