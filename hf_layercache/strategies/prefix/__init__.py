"""``prefix``: lossless reuse of shared prompt prefixes in causal decoders (system prompts, few-shot preambles).

In a causal decoder the key/value states and the output of token ``j`` depend only on tokens ``0..j``. So once a
prompt has been computed, any later prompt that starts with the same tokens can take those tokens' states from the
cache and compute only the rest, through the model's own KV-cache path, with the same result.

How it works:

* **Blocks and chains.** A row's real tokens (padding excluded) are cut into blocks of ``config.block_size``. Block
  ``i``'s key is ``blake2b(key of block i-1, tokens of block i)`` and block 0 chains from a root over the namespace
  and the block size, so one key stands for the whole prefix up to its block and tenants never share entries (the
  vLLM and LMCache scheme). An entry holds the block's keys and values of every layer and its final hidden states
  (the base model's ``last_hidden_state``), in one bank for the layer stack.
* **Lookup.** Each row follows its chain until the first missing block, then looks among the cached blocks that
  hang on the last block it found (complete ones, and the partial last blocks of earlier prompts) for the one that
  shares the most leading tokens with its next block: reuse is token-exact, as in a radix tree, while keys stay
  per block. A shared preamble that ends mid-block is reused to its last token.
* **Every row reuses all it has cached** (:mod:`.layout`). A call computes one rectangle, columns ``[split, L)``
  of every row, after a cache holding ``[0, split)``. A row whose cached prefix ends later than ``split`` has it
  laid into the cache to end at ``split`` (its positions come from ``position_ids``; the mask hides the columns it
  left) and written back to its own columns after the call. Rows that cannot share a rectangle so (a cold row
  beside warm ones) or would widen it by more than a call costs are computed in calls of their own, merged back.
* **Outputs.** The suffix runs with ``input_ids[:, split:]``, the group's attention mask, ``position_ids[:, split:]``
  and a ``DynamicCache`` holding the prefix. The base model's suffix output is spliced behind the cached hidden
  states of the prefix, so heads (``lm_head``) see full-length states: logits of every position equal uncached
  ones, and ``logits_to_keep`` / ``generate`` work unchanged. Storing the final hidden states (``hidden_size`` per
  token) rather than logits (``vocab_size`` per token, 85x more for SmolLM2) costs re-running the head over reused
  positions when full logits are asked for; ``generate`` asks for the last position only.
* **Storing.** Every row's new blocks (its last one even when incomplete) are read from the filled cache and the
  spliced output after the call. Chain tails are inserted first and reused blocks are touched tail first, so
  recency-based policies evict a chain from its tail, never its shared head.

Exactness: a block's states are reused only at the positions they were computed at, so a row is eligible only
when its real tokens sit at positions ``0..n-1`` (``position_ids`` from the attention mask, as ``generate``
passes, or no padding before the tokens). Anything else is computed whole: inputs the strategy does not know
(``inputs_embeds``, ``token_type_ids``, ``labels``...), caches other than an empty ``DynamicCache``, masks that are
not one contiguous run of real tokens. Decode steps (a non-empty cache) pass through unchanged, but inside
``generate()`` the tokens they feed and their final hidden states are noted, and stored as blocks when the call
returns (:mod:`.answers`): a chat's next turn reuses the model's answer as well as its prompt. Rows repeated inside
one call are computed once and copied (:func:`.layout.copies`).

Statistics count token positions: a hit is a reused real token, a miss a computed real token, in every layer.

The request path (:meth:`.strategy.PrefixStrategy.forward_request`), top to bottom: rows (:class:`.lookup.RowLookup`),
plan (:func:`.layout.plan`), then one of an audit (:class:`.audit.CallAudit`, a call drawn by ``verify_fraction``
computed whole), the plain call, or the groups' calls (:class:`.call.GroupCall`: gather, suffix call, splice,
restore, store), merged, and the lookup recorded once. The base model's output is reached by one route,
:class:`.base_call.BaseModelCall`: the return value when the cached model is the base model, a forward hook on it
when a head sits around it.

Where each part lives, dependencies pointing down the list (no module imports one above it):

* :mod:`.strategy` -- ``PrefixStrategy``: the model gate, the bank, the collaborators built in ``attach``, the
  request path, the lookup's record, the sibling index rebuilt after a load;
* :mod:`.answers` -- ``AnswerRecorder``: a ``generate()`` call's decoded tokens stored as blocks when it returns
  (conversation turns reuse the model's answers);
* :mod:`.audit` -- ``CallAudit``: ``verify_fraction``'s whole calls, blocks compared and bad chains dropped;
* :mod:`.call` -- ``GroupCall``: each group's prefix gathered into its cache, the suffix call, the splice, the
  caller's layout restored, the groups' outputs and caches merged;
* :mod:`.lookup` -- ``RowLookup``: a request's rows, their chains and siblings in the bank;
* :mod:`.shared_blocks` -- ``fetch_blocks``: the rows' blocks from the shared tier, one round trip;
* :mod:`.store` -- ``BlockStore``: a call's new blocks into the bank, the shared tier and the sibling index;
* :mod:`.base_call` -- ``BaseModelCall``: the one route to the base model's output of a call;
* :mod:`.layout` -- which rows share a call (``plan``), where each row's prefix sits in it (``call_mask``,
  ``moves``);
* :mod:`.run` -- the data they share: ``Row``, ``PendingBlock``, ``Group``, ``PrefixRun``;
* :mod:`.siblings` (the index of cached blocks under each parent, for token-granular matching), :mod:`.slots`
  (the storage whose blocks live in slots of preallocated slabs), :mod:`.chain` (block digests and hash chains),
  :mod:`.block` (the entry, ``PrefixBlock``, and ``BlockShape``), :mod:`.config` (``block_size``).

Which models are served is model knowledge: :func:`hf_layercache.models.prefix_support`.
"""
