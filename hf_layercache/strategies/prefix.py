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
* **One split column for the batch.** The batch is computed as one rectangle: columns ``[0, split)`` come from the
  cache, columns ``[split, L)`` are computed for every row. Row ``r`` with ``first_r`` leading pad columns and
  ``cached_r`` cached tokens allows ``split <= first_r + cached_r``, so ``split`` is the minimum over rows (and at
  most ``L - 1``: one column is always computed). Row ``r`` then reuses ``split - first_r`` tokens (pad columns of
  the cache are zeros, masked like the pads of an uncached run). With left padding (what ``generate`` does) a
  shorter row's extra pads count towards its allowance, so rows of different lengths and prefixes share one call;
  its cost is that a row with little cached beside rows with much cached limits what all of them reuse.
* **Outputs.** The suffix runs with ``input_ids[:, split:]``, the full attention mask, ``position_ids[:, split:]``
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
not one contiguous run of real tokens. Decode steps (a non-empty cache) pass through unchanged.

Statistics count token positions: a hit is a reused real token, a miss a computed real token, in every layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.utils import ModelOutput

from ..bank import DIGEST_BYTES
from ..kv import CACHE_ARGUMENTS, cache_parameter, find_cache, without_cache
from ..registry import register_strategy
from ..request import RequestScope, current_scope
from .base import Strategy

_RUN = "prefix.run"
SUPPORTED_MODELS: dict[str, tuple[str, ...]] = {
    "llama": ("LlamaModel", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Model", "Qwen2ForCausalLM"),
    "gpt2": ("GPT2Model", "GPT2LMHeadModel"),
}
"""Model types with the classes whose outputs are per-position functions of the base model's output (tested).
Other heads read ``input_ids`` themselves (sequence classification finds the last token in them), so they are
refused rather than risked."""
_HANDLED = frozenset({"input_ids", "attention_mask", "position_ids", "logits_to_keep", *CACHE_ARGUMENTS})
"""Tensor arguments the strategy understands; a call with any other tensor argument is computed whole."""
_FIELDS = ("key", "value", "hidden", "tokens", "parent")


# --- keys -----------------------------------------------------------------------------------------------------------
def chain_root(namespace: str, block_size: int) -> bytes:
    """The digest block 0 chains from: tenants and block sizes never share a chain."""
    label = json.dumps(["hf_layercache.prefix", 1, namespace, block_size]).encode()
    return hashlib.blake2b(label, digest_size=DIGEST_BYTES).digest()


def chain_step(parent: bytes, tokens: torch.Tensor) -> bytes:
    """The digest of a block of ``tokens`` (1-D) following the block whose digest is ``parent``."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
    h.update(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.digest()


def chain_digests(tokens: torch.Tensor, block_size: int, root: bytes) -> list[bytes]:
    """One digest per complete block of ``tokens`` (1-D); block ``i``'s digest covers blocks ``0..i``."""
    digests, previous = [], root
    for start in range(0, len(tokens) - block_size + 1, block_size):
        previous = chain_step(previous, tokens[start : start + block_size])
        digests.append(previous)
    return digests


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens two 1-D token tensors share."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


class SiblingIndex:
    """Which entries hang on each parent digest, with their tokens: where token-granular matching looks.

    The index only proposes: an entry is served after its own stored parent and tokens are checked, so a stale
    index (after an eviction, ``clear()`` or a load) can cost a hit, never serve a wrong one. A parent keeps its
    ``limit`` most recently stored or used children; evicted entries are swept out as the index grows.
    """

    def __init__(self, limit: int = 32):
        self.limit = limit
        self._children: dict[bytes, dict[int, torch.Tensor]] = {}
        self._added = 0
        self._lock = threading.Lock()

    def add(self, parent: bytes, entry_id: int, tokens: torch.Tensor) -> None:
        """Record (or refresh) a child, most recent last."""
        with self._lock:
            children = self._children.setdefault(parent, {})
            children.pop(entry_id, None)
            children[entry_id] = tokens
            if len(children) > self.limit:
                children.pop(next(iter(children)))
            self._added += 1

    def discard(self, parent: bytes, entry_id: int) -> None:
        with self._lock:
            self._children.get(parent, {}).pop(entry_id, None)

    def candidates(self, parent: bytes) -> list[tuple[int, torch.Tensor]]:
        """The children of ``parent``, most recent first."""
        with self._lock:
            return list(reversed(self._children.get(parent, {}).items()))

    def sweep_if_large(self, alive: Callable[[int], bool], entries: int) -> None:
        """Drop evicted children once more were added since the last sweep than the bank holds (amortised O(1))."""
        with self._lock:
            if self._added <= max(256, entries):
                return
            for parent in list(self._children):
                kept = {i: t for i, t in self._children[parent].items() if alive(i)}
                if kept:
                    self._children[parent] = kept
                else:
                    del self._children[parent]
            self._added = 0

    def __len__(self) -> int:
        with self._lock:
            return sum(len(children) for children in self._children.values())

    def replace(self, children: list[tuple[bytes, int, torch.Tensor]]) -> None:
        with self._lock:
            self._children.clear()
        for parent, entry_id, tokens in children:
            self.add(parent, entry_id, tokens)


# --- per request ----------------------------------------------------------------------------------------------------
@dataclass
class Block:
    """A block of a row to store after the call: its key, its parent's key, where it starts and its length."""

    digest: bytes
    parent: bytes
    start: int
    size: int


@dataclass
class Row:
    """One row of a request: where its real tokens are and what of them the cache holds."""

    first: int
    """Column of the first real token (the number of left pad columns)."""
    length: int
    """Real tokens."""
    tokens: torch.Tensor | None = None
    """The real tokens (CPU), or ``None`` when the row may neither reuse nor store (its positions do not fit)."""
    digests: list[bytes] = field(default_factory=list)
    """Chain digests of its complete blocks."""
    found: list[int] = field(default_factory=list)
    """Entry ids of its leading cached complete blocks."""
    tail: tuple[int, int] | None = None
    """``(entry id, tokens)``: a cached sibling of its next block sharing that many leading tokens."""
    entries: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """The stored tensors of ``found`` and ``tail``, held for this call even if the bank evicts them meanwhile."""
    pending: list[Block] = field(default_factory=list)
    """Its blocks the bank lacks, stored after the call."""
    reused: int = 0
    """Real tokens taken from the cache in this call."""

    def cached(self, block_size: int) -> int:
        return len(self.found) * block_size + (self.tail[1] if self.tail else 0)


@dataclass
class PrefixRun:
    """One prefill: the split column, the cache it starts from, and what the base model's call produced."""

    rows: list[Row]
    split: int
    cache: DynamicCache
    prefix_hidden: torch.Tensor | None
    keep_cache: bool
    hidden: torch.Tensor | None = None
    """The base model's full-length final hidden states, once its call has returned."""


@register_strategy("prefix")
class PrefixStrategy(Strategy):
    """Lossless: the longest cached prefix of each row is reused, only the suffix is computed."""

    intermediate_states_exact = False  # hidden states of reused positions in inner layers are not recomputed

    def attach(self) -> None:
        model = self.controller.model
        self.owner = self._check_model(model)
        self.block_size = self.config.block_size
        self.n_layers = len(self.layers)
        text = self.owner.config
        heads = text.num_attention_heads
        self.kv_heads = getattr(text, "num_key_value_heads", None) or heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        self.hidden_size = text.hidden_size
        self.bank = self.new_bank(self.layers[0].stack, self.layers[-1].device, n_banks=1)
        self.siblings = SiblingIndex()
        if self.owner is not model:
            self.hooks.forward_hook(self.owner, self._splice_hook)

    def _check_model(self, model: torch.nn.Module) -> PreTrainedModel:
        """The base model owning the layer stack; ``ValueError`` for anything prefix reuse cannot serve exactly."""
        config = getattr(model, "config", None)
        name = type(model).__name__
        model_type = getattr(config, "model_type", None)
        alternative = "Use strategy='exact' to reuse whole repeated requests instead."
        if getattr(config, "is_encoder_decoder", False) or model_type not in SUPPORTED_MODELS:
            raise ValueError(
                f"strategy='prefix' reuses prompt prefixes of causal decoders ({', '.join(SUPPORTED_MODELS)}); "
                f"{name} (model_type {model_type!r}) is not one of them. {alternative}"
            )
        if name not in SUPPORTED_MODELS[model_type]:
            raise ValueError(
                f"strategy='prefix' supports {', '.join(SUPPORTED_MODELS[model_type])} for model_type "
                f"{model_type!r}, not {name}: its head may read input_ids, which prefix reuse shortens. {alternative}"
            )
        stacks = {layer.stack for layer in self.layers}
        modules = dict(model.named_modules())
        stack = next(iter(stacks))
        if len(stacks) != 1 or len(self.layers) != len(modules[stack]):
            raise ValueError(
                f"strategy='prefix' reuses the key/value states of every layer of one stack, but the selected layers "
                f"are {[layer.name for layer in self.layers]}; leave layers=None."
            )
        owner = modules.get(stack.rpartition(".")[0], model)
        if getattr(owner.config, "add_cross_attention", False) or any(DynamicCache(config=owner.config).is_sliding):
            raise ValueError(
                f"strategy='prefix' needs full causal self-attention in every layer; {name} has cross-attention or "
                f"sliding-window layers. {alternative}"
            )
        return owner

    # --- one request ----------------------------------------------------------------------------------------------
    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        rows = self._rows(scope, arguments)
        if rows is None:
            self._record(bypassed=_token_count(arguments))
            return original(**arguments)
        split = self._split(rows, arguments["input_ids"].shape[1])
        if split == 0 and not any(row.pending for row in rows):
            start = time.perf_counter()  # nothing to reuse, nothing to store: the plain call, counted
            output = original(**arguments)
            self._record(misses=sum(row.length for row in rows), seconds=time.perf_counter() - start)
            return output
        run = self._prepare(arguments, rows, split)
        scope.state[_RUN] = run
        start = time.perf_counter()
        output = original(**self._suffix_arguments(arguments, run, cache_parameter(original)))
        seconds = time.perf_counter() - start
        if self.owner is self.controller.model:
            output = self._splice(output, run)
        if run.hidden is None:
            raise RuntimeError(f"prefix strategy: {type(self.owner).__name__} was not called; outputs would be short.")
        computed = sum(row.length - row.reused for row in rows)
        self._store(run, seconds / max(computed, 1))
        self._touch(rows)
        self._record(hits=sum(row.reused for row in rows), misses=computed, seconds=seconds)
        return output

    def _rows(self, scope: RequestScope, arguments: dict[str, Any]) -> list[Row] | None:
        """Per row: real tokens, what the cache holds of them, what to store; ``None``: the call passes through."""
        input_ids = arguments.get("input_ids")
        mask = arguments.get("attention_mask")
        positions = arguments.get("position_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            return None
        if any(_is_data(v) for k, v in arguments.items() if k not in _HANDLED):
            return None
        if not _fillable(find_cache(arguments)):
            return None  # a decode step, or a cache this strategy does not fill
        if mask is not None and (mask.dim() != 2 or mask.shape != input_ids.shape):
            return None
        if positions is not None and (positions.dim() != 2 or positions.shape[-1] != input_ids.shape[1]):
            return None
        batch, length = input_ids.shape
        ids = input_ids.detach().cpu()
        mask = mask.detach().cpu() if mask is not None else torch.ones(batch, length, dtype=torch.long)
        positions = positions.detach().cpu().expand(batch, length) if positions is not None else None
        root = chain_root(scope.namespace, self.block_size)
        rows = [self._row(ids[r], mask[r], positions[r] if positions is not None else None) for r in range(batch)]
        for row in rows:
            if row.tokens is not None:
                self._lookup(row, root)
        return rows

    def _row(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None) -> Row:
        real = mask.nonzero().flatten()
        if real.numel() == 0:
            return Row(first=len(ids), length=0)
        first, length = int(real[0]), real.numel()
        contiguous = int(real[-1]) - first + 1 == length and bool((mask[real] == 1).all())
        own = positions[first : first + length] if positions is not None else torch.arange(first, first + length)
        if not contiguous or not torch.equal(own, torch.arange(length, dtype=own.dtype)):
            return Row(first=first, length=length)  # states would sit at other positions: computed whole
        return Row(first=first, length=length, tokens=ids[first : first + length])

    def _lookup(self, row: Row, root: bytes) -> None:
        """Follow the row's chain, then match its next block against the siblings; list the blocks to store."""
        size = self.block_size
        row.digests = chain_digests(row.tokens, size, root)
        parent = root
        for digest in row.digests:
            entry_id = self.bank.find(digest)
            values = self.bank.get(entry_id) if entry_id is not None else None
            if values is None or not self._fits(values, size):
                break
            row.found.append(entry_id)
            row.entries.append(values)
            parent = digest
        start = len(row.found) * size
        if start < row.length:
            self._match_sibling(row, parent, row.tokens[start : start + size])
        parents = [root, *row.digests]
        row.pending = [Block(d, parents[b], b * size, size) for b, d in enumerate(row.digests) if b >= len(row.found)]
        rest = row.length % size
        if rest:
            digest = chain_step(parents[-1], row.tokens[-rest:])
            if self.bank.find(digest) is None:
                row.pending.append(Block(digest, parents[-1], row.length - rest, rest))

    def _match_sibling(self, row: Row, parent: bytes, upcoming: torch.Tensor) -> None:
        """The cached child of ``parent`` sharing the most leading tokens with ``upcoming``, checked on the entry."""
        ranked = sorted(
            ((common_prefix(tokens, upcoming), entry_id) for entry_id, tokens in self.siblings.candidates(parent)),
            key=lambda candidate: -candidate[0],  # stable: among equals, the most recent first
        )
        for shared, entry_id in ranked:
            if shared == 0:
                return
            values = self.bank.get(entry_id)
            if (
                values is not None
                and self._fits(values)
                and bytes(values["parent"].cpu().tolist()) == parent
                and common_prefix(values["tokens"].cpu(), upcoming) >= shared
            ):
                row.tail = (entry_id, shared)
                row.entries.append(values)
                return
            self.siblings.discard(parent, entry_id)  # evicted, or a stale hint: never served

    def _fits(self, values: dict[str, torch.Tensor], size: int | None = None) -> bool:
        """An entry of this model's shapes; of exactly ``size`` tokens when given."""
        if any(name not in values for name in _FIELDS):
            return False
        n = values["tokens"].numel()
        kv = (self.n_layers, self.kv_heads, n, self.head_dim)
        return (
            1 <= n <= self.block_size
            and (size is None or n == size)
            and tuple(values["key"].shape) == kv
            and tuple(values["value"].shape) == kv
            and tuple(values["hidden"].shape) == (n, self.hidden_size)
        )

    def _split(self, rows: list[Row], length: int) -> int:
        """The first computed column: every row must have cached all its real tokens before it."""
        limits = [row.first + row.cached(self.block_size) for row in rows if row.length]
        split = max(0, min([length - 1, *limits]))
        for row in rows:
            row.reused = min(max(0, split - row.first), row.length)
        return split

    def _prepare(self, arguments: dict[str, Any], rows: list[Row], split: int) -> PrefixRun:
        """The cache the suffix continues from, filled with the reused prefix of every row."""
        cache = find_cache(arguments)
        if cache is None:
            cache = DynamicCache(config=self.owner.config)
        use_cache = arguments.get("use_cache")
        keep_cache = bool(use_cache if use_cache is not None else getattr(self.owner.config, "use_cache", True))
        if split == 0:
            return PrefixRun(rows, 0, cache, None, keep_cache)
        keys, values, hidden = self._gather(rows, split)
        for i, layer in enumerate(self.layers):
            cache.update(keys[i].to(layer.device), values[i].to(layer.device), i)
        return PrefixRun(rows, split, cache, hidden, keep_cache)

    def _gather(self, rows: list[Row], split: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values (layer, batch, head, column, dim) and final hidden states of columns ``[0, split)``.

        Pad columns are zeros: the attention mask hides them, as it hides the pads of an uncached run.
        """
        options = {"dtype": self.controller.model.dtype, "device": self.bank.device}
        keys = torch.empty((self.n_layers, len(rows), self.kv_heads, split, self.head_dim), **options)
        values = torch.empty_like(keys)
        hidden = torch.empty((len(rows), split, self.hidden_size), **options)
        for r, row in enumerate(rows):
            pads = split - row.reused  # a row's reused tokens end at the split column
            keys[:, r, :, :pads], values[:, r, :, :pads], hidden[r, :pads] = 0, 0, 0
            for b in range(math.ceil(row.reused / self.block_size)):
                entry = row.entries[b]
                start = pads + b * self.block_size
                width = min(self.block_size, split - start)
                keys[:, r, :, start : start + width] = entry["key"][:, :, :width]
                values[:, r, :, start : start + width] = entry["value"][:, :, :width]
                hidden[r, start : start + width] = entry["hidden"][:width]
        return keys, values, hidden

    @staticmethod
    def _suffix_arguments(arguments: dict[str, Any], run: PrefixRun, cache_name: str) -> dict[str, Any]:
        """The call for the suffix columns, continuing from the prefix cache (under the name ``forward`` uses)."""
        suffix = without_cache(arguments)
        suffix[cache_name] = run.cache
        suffix["input_ids"] = arguments["input_ids"][:, run.split :]
        if arguments.get("position_ids") is not None:
            suffix["position_ids"] = arguments["position_ids"][..., run.split :]
        return suffix

    # --- output ---------------------------------------------------------------------------------------------------
    def _splice_hook(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on the base model inside a head model: widen its output before the head reads it."""
        scope = current_scope()
        run = scope.state.get(_RUN) if scope is not None else None
        if run is None or run.hidden is not None:
            return None
        return self._splice(output, run)

    def _splice(self, output: Any, run: PrefixRun) -> Any:
        """The base model's output with the cached prefix states in front of the computed suffix states."""
        suffix = output[0]
        full = suffix
        if run.prefix_hidden is not None:
            full = torch.cat([run.prefix_hidden.to(device=suffix.device, dtype=suffix.dtype), suffix], dim=1)
        run.hidden = full
        if isinstance(output, ModelOutput):
            values = dict(output.items())
            values[next(iter(values))] = full
            if not run.keep_cache:  # uncached, use_cache=False returns no cache
                values = {k: v for k, v in values.items() if v is not run.cache}
            return type(output)(**values)
        return (full, *(x for x in output[1:] if run.keep_cache or x is not run.cache))

    # --- bookkeeping ----------------------------------------------------------------------------------------------
    def _store(self, run: PrefixRun, seconds_per_token: float) -> None:
        """Put every row's pending blocks in the bank, chain tails first, and index them under their parents."""
        if run.cache.get_seq_length() != run.hidden.shape[1]:
            return  # the model did not leave the states we expect: store nothing rather than guess
        layers = run.cache.layers[: self.n_layers]
        stored: set[bytes] = set()
        pending = [(r, row, block) for r, row in enumerate(run.rows) for block in row.pending]
        for r, row, block in reversed(pending):
            if block.digest in stored or self.bank.find(block.digest) is not None:
                continue
            stored.add(block.digest)
            column, tokens = row.first + block.start, row.tokens[block.start : block.start + block.size].clone()
            end = column + block.size
            values = {
                "key": torch.stack([layer.keys[r, :, column:end].to(self.bank.device) for layer in layers]),
                "value": torch.stack([layer.values[r, :, column:end].to(self.bank.device) for layer in layers]),
                "hidden": run.hidden[r, column:end],
                "tokens": tokens,
                "parent": torch.frombuffer(bytearray(block.parent), dtype=torch.uint8),
            }
            entry_id = self.bank.put(values, digest=block.digest, cost=seconds_per_token * block.size)
            if entry_id is not None:
                self.siblings.add(block.parent, entry_id, tokens)
        self.siblings.sweep_if_large(self.bank.__contains__, len(self.bank))

    def _touch(self, rows: list[Row]) -> None:
        """Tell the policy what was found, tail first, so a chain's shared head is its most recent entry."""
        for row in rows:
            if row.tail is not None:
                self.bank.record_hit(row.tail[0])
            for entry_id in reversed(row.found):
                self.bank.record_hit(entry_id)
            if row.pending:
                self.bank.record_miss()

    def _record(self, hits: int = 0, misses: int = 0, seconds: float = 0.0, bypassed: int = 0) -> None:
        """Every layer reuses or computes the same token positions; the call's time is shared out evenly."""
        stats = self.controller.stats_
        for layer in self.layers:
            if bypassed:
                stats.record_bypass(layer.name, bypassed)
            else:
                stats.record(layer.name, hits=hits, misses=misses, compute_seconds=seconds / self.n_layers)

    # --- persistence ----------------------------------------------------------------------------------------------
    def check_state(self, bank_name: str, state: dict[str, torch.Tensor]) -> None:
        """Refuse entries of other shapes."""
        super().check_state(bank_name, state)
        if not bool(state["has_digest"].all()):
            raise ValueError("every prefix entry needs its chain digest.")
        entries: dict[int, dict[str, torch.Tensor]] = {int(i): {} for i in state["ids"].tolist()}
        for name, tensor in state.items():
            if name.startswith("entry."):
                _, entry_id, kind = name.split(".", 2)
                entries[int(entry_id)][kind] = tensor
        for entry_id, values in entries.items():
            self._check_entry(entry_id, values)

    def banks_replaced(self) -> None:
        """After a load (or a clear), index the siblings of the bank's entries: a warm cache's children become
        findable, and a cleared bank's hints go."""
        self.siblings.replace([(bytes(v["parent"].tolist()), i, v["tokens"]) for i, v in self.bank.items()])

    def _check_entry(self, entry_id: int, values: dict[str, torch.Tensor]) -> None:
        tokens, parent = values.get("tokens"), values.get("parent")
        if set(values) != set(_FIELDS):
            raise ValueError(f"entry {entry_id} has {sorted(values)}; prefix entries hold {sorted(_FIELDS)}.")
        if tokens.dtype != torch.int64 or tokens.dim() != 1 or parent.dtype != torch.uint8 or parent.shape != (32,):
            raise ValueError(f"entry {entry_id}: 'tokens' must be 1-D int64 and 'parent' 32 uint8 bytes.")
        if not all(values[k].is_floating_point() for k in ("key", "value", "hidden")) or not self._fits(values):
            n = tokens.numel()
            raise ValueError(
                f"entry {entry_id} has key {tuple(values['key'].shape)}, hidden {tuple(values['hidden'].shape)}; "
                f"this model's blocks of {n} tokens need floating key/value "
                f"{(self.n_layers, self.kv_heads, n, self.head_dim)} and hidden {(n, self.hidden_size)}, with "
                f"1 <= {n} <= block_size {self.block_size}."
            )


def _is_data(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (value is not None and hasattr(value, "get_seq_length"))


def _fillable(cache: Any) -> bool:
    """``None`` or an empty ``DynamicCache`` of full-attention layers: the caches a prefix can be put into."""
    if cache is None:
        return True
    return (
        isinstance(cache, DynamicCache)
        and cache.get_seq_length() == 0
        and all(type(layer) is DynamicLayer for layer in cache.layers)
    )


def _token_count(arguments: dict[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0] * value.shape[1])
    return 0


__all__ = ["SUPPORTED_MODELS", "PrefixStrategy", "SiblingIndex", "chain_digests", "chain_root", "chain_step"]
