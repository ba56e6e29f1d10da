"""``exact``: lossless reuse of identical requests. A repeated row skips every cached layer.

How it works, per layer stack (``encoder.layer``, ``model.layers``, ...):

* The top-level forward hashes each row of its inputs into a digest (:func:`.digests.row_keys`). In a model with
  one layer stack (encoders, decoders) it covers the row's *real* tokens only (token ids, types, positions,
  embeddings at the attention mask's ones, and where they start when no ``position_ids`` say so), so a text hits
  whatever batch it arrives in and however that batch is padded: its stored states are placed into the new layout
  (real positions equal uncached within 1e-5; the layout it was computed in is served bit for bit; pad positions
  of another layout are zeros). An encoder-decoder, or a row whose mask is not one run of ones, keys its whole row,
  layout included. The namespace is in every digest, every field length-prefixed.
* The first cached layer of the stack looks every row up in the stack's bank. Hit rows are *passed through* by the
  layers (their hidden state is not touched) and the last cached layer returns the stored output, as diffusers'
  First Block Cache skips its middle blocks. Missed rows are computed; when the layer's arguments allow it, only
  those rows are (a sub-batch), otherwise the whole batch is.
* Decoders: every layer's key/value-cache writes are recorded on a miss and replayed on a hit
  (:mod:`hf_layercache.kv`), so ``generate()`` continues from a cache equal to an uncached prefill at the real
  tokens (pad columns are zeros, hidden by the mask). Decode steps (a non-empty KV cache) never look up. With a KV
  cache a batch is served all-or-nothing.

Intermediate hidden states of hit rows are not real, so requests with ``output_hidden_states`` run uncached.
"""
