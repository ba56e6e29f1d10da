"""``exact``: lossless reuse of identical requests. A repeated row skips every cached layer.

How it works, per layer stack (``encoder.layer``, ``model.layers``, ...):

* The top-level forward hashes each row of its inputs (token ids, masks, positions, embeddings, ...) into a digest
  (:func:`row_digests`). A row's digest covers every tensor its output depends on, the namespace included.
* The first cached layer of the stack looks every row up in the stack's bank. Hit rows are *passed through* by the
  layers (their hidden state is not touched) and the last cached layer returns the stored output, as diffusers'
  First Block Cache skips its middle blocks. Missed rows are computed; when the layer's arguments allow it, only
  those rows are (a sub-batch), otherwise the whole batch is.
* Decoders: every layer's key/value-cache writes are recorded on a miss and replayed on a hit
  (:mod:`hf_layercache.kv`), so ``generate()`` continues from a cache identical to an uncached prefill. Decode steps
  (a non-empty KV cache) never look up. With a KV cache a batch is served all-or-nothing.

Intermediate hidden states of hit rows are not real, so requests with ``output_hidden_states`` run uncached.
"""

from .entry import ExactEntry
from .strategy import ExactStrategy

__all__ = ["ExactEntry", "ExactStrategy"]
