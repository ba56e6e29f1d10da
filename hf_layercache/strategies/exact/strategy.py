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

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kv import CACHE_ARGUMENTS, KVWrite, find_cache, past_length, record_kv_writes, replay_kv_writes, stack_writes
from ..layers import CachedLayer, rows_splittable, select_rows
from ..registry import register_strategy
from ..request import RequestScope
from .base import LayerHook, StackStrategy

_ROWS = "exact.rows"
# Model-level arguments that never carry the batch in dimension 0, even when their length happens to equal it.
_NOT_PER_ROW = frozenset({"cache_position", *CACHE_ARGUMENTS})
_BATCH_SOURCES = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "hidden_states")


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_tensors(v)]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def _host_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _batch_size(arguments: dict[str, Any]) -> int | None:
    for name in _BATCH_SOURCES:
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def row_digests(arguments: dict[str, Any], namespace: str) -> list[bytes] | None:
    """One blake2b digest per row over every tensor argument (its row slice, or all of it when shared).

    Deterministic across processes (no Python ``hash``). ``None`` when the batch size cannot be told.
    """
    batch = _batch_size(arguments)
    if batch is None:
        return None
    parts: list[tuple[bytes, torch.Tensor, bool]] = []
    for name in sorted(arguments):
        for i, t in enumerate(_flat_tensors(arguments[name])):
            per_row = name not in _NOT_PER_ROW and t.dim() > 0 and t.shape[0] == batch
            parts.append((f"{name}.{i}:{t.dtype}".encode(), t.detach().cpu() if per_row else t, per_row))
    digests = []
    for row in range(batch):
        h = hashlib.blake2b(namespace.encode(), digest_size=32)
        for label, t, per_row in parts:
            piece = t[row] if per_row else t
            h.update(label + str(tuple(piece.shape)).encode())
            h.update(_host_bytes(piece))
        digests.append(h.digest())
    return digests


@dataclass
class StackRun:
    """What one forward pass knows about one layer stack: which rows hit and what the missed rows produced."""

    digests: list[bytes]
    hits: dict[int, dict[str, torch.Tensor]]
    misses: list[int]
    split: bool
    with_kv: bool
    writes: dict[int, list[KVWrite]] = field(default_factory=dict)
    seconds_per_row: float = 0.0

    @property
    def batch(self) -> int:
        return len(self.digests)


def _entry_writes(values: dict[str, torch.Tensor], position: int) -> list[KVWrite]:
    """The recorded KV writes of layer ``position`` in an entry (names ``kv.<pos>.<i>.<tag>.<layer_idx>.key``)."""
    prefix = f"kv.{position}."
    found: dict[int, KVWrite] = {}
    for name, tensor in values.items():
        if name.startswith(prefix) and name.endswith(".key"):
            _, _, i, tag, layer_idx, _ = name.split(".")
            found[int(i)] = KVWrite(tag, int(layer_idx), tensor, values[name[: -len("key")] + "value"])
    return [found[i] for i in sorted(found)]


class ExactLayerHook(LayerHook):
    def __init__(self, strategy: ExactStrategy, layer: CachedLayer, position: int, last: bool):
        super().__init__(strategy, layer, position)
        self.last = last

    def forward_run(self, run: StackRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        if not run.misses:
            return self._serve(run, arguments, hidden)
        if run.hits:
            return self._compute_missed_rows(run, arguments, hidden)
        return self._compute_all(run, arguments, hidden)

    # --- the three cases ------------------------------------------------------------------------------------------
    def _serve(self, run: StackRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        if run.with_kv:
            rows = [_entry_writes(run.hits[r], self.position) for r in range(run.batch)]
            replay_kv_writes(find_cache(arguments), stack_writes(rows) if rows[0] else [])
        self.strategy.controller.stats_.record(self.layer.name, hits=run.batch)
        out = self._cached_hidden(run, range(run.batch), hidden) if self.last else hidden
        return self.pack(out)

    def _compute_all(self, run: StackRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        start = time.perf_counter()
        with record_kv_writes(find_cache(arguments) if run.with_kv else None) as writes:
            out = self.original(**arguments)
        seconds = time.perf_counter() - start
        self.observe(out)
        run.writes[self.position] = writes
        run.seconds_per_row += seconds / run.batch
        self.strategy.controller.stats_.record(self.layer.name, misses=run.batch, compute_seconds=seconds)
        if self.last:
            self.strategy.store(run, self.layer, out[0] if isinstance(out, tuple) else out, run.misses)
        return out

    def _compute_missed_rows(self, run: StackRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        missed = torch.tensor(run.misses, device=hidden.device)
        start = time.perf_counter()
        out = self.original(**select_rows(arguments, self.layer.spec, missed, run.batch))
        seconds = time.perf_counter() - start
        self.observe(out)
        run.seconds_per_row += seconds / len(run.misses)
        self.strategy.controller.stats_.record(
            self.layer.name, hits=len(run.hits), misses=len(run.misses), compute_seconds=seconds
        )
        computed = out[0] if isinstance(out, tuple) else out
        full = hidden.clone()
        full[missed] = computed.to(full.dtype)
        if self.last:
            hit_rows = sorted(run.hits)
            full[torch.tensor(hit_rows, device=hidden.device)] = self._cached_hidden(run, hit_rows, hidden)
            self.strategy.store(run, self.layer, computed, list(range(len(run.misses))), rows=run.misses)
        if not isinstance(out, tuple):
            return full
        return (full, *(self._scatter(x, missed, run.batch) for x in out[1:]))

    # --- helpers --------------------------------------------------------------------------------------------------
    def _cached_hidden(self, run: StackRun, rows, like: torch.Tensor) -> torch.Tensor:
        return torch.stack([run.hits[r]["hidden"] for r in rows]).to(device=like.device, dtype=like.dtype)

    @staticmethod
    def _scatter(x: Any, missed: torch.Tensor, batch: int) -> Any:
        """Extra outputs of a sub-batch (T5's position bias) widened back to the whole batch."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(missed) or x.shape[0] == batch:
            return x
        full = x.new_zeros((batch, *x.shape[1:]))
        full[missed] = x
        return full


@register_strategy("exact")
class ExactStrategy(StackStrategy):
    """Lossless: identical requests skip every cached layer; outputs equal uncached ones bit for bit."""

    intermediate_states_exact = False

    def attach(self) -> None:
        stacks: dict[str, list[CachedLayer]] = {}
        for layer in self.layers:
            stacks.setdefault(layer.stack, []).append(layer)
        for stack, layers in stacks.items():
            positions = [layer.index_in_stack for layer in layers]
            if positions != list(range(positions[0], positions[0] + len(positions))):
                raise ValueError(
                    f"strategy='exact' skips a contiguous run of layers, but the layers selected in {stack!r} are "
                    f"{positions}; select a contiguous range."
                )
            self.new_bank(stack, layers[-1].device, n_banks=len(stacks))
        for layers in stacks.values():
            for position, layer in enumerate(layers):
                self.hooks.replace_forward(
                    layer.module, ExactLayerHook(self, layer, position, last=position == len(layers) - 1)
                )

    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:
        scope.state[_ROWS] = row_digests(arguments, scope.namespace)

    def start_run(
        self, scope: RequestScope, layer: CachedLayer, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> StackRun | None:
        """Look every row up in the stack's bank; ``None`` when this call cannot use the cache."""
        request_digests = scope.state.get(_ROWS)
        cache = find_cache(arguments)
        if not request_digests or len(request_digests) != hidden.shape[0] or past_length(cache) > 0:
            return None  # nothing to key on (or an empty batch), or a decode step
        bank = self.banks[layer.stack]
        with_kv = cache is not None and arguments.get("use_cache", True) is not False
        digests = [hashlib.blake2b(d + layer.stack.encode(), digest_size=32).digest() for d in request_digests]
        hits: dict[int, dict[str, torch.Tensor]] = {}
        for row, digest in enumerate(digests):
            entry_id = bank.find(digest)
            values = bank.get(entry_id) if entry_id is not None else None
            if values is not None and self._usable(values, hidden, with_kv):
                hits[row] = values
                bank.record_hit(entry_id)
            else:
                bank.record_miss()
        misses = [row for row in range(len(digests)) if row not in hits]
        split = not with_kv and rows_splittable(arguments, layer.spec, len(digests))
        if hits and misses and not split:
            misses, hits = list(range(len(digests))), {}
        return StackRun(digests, hits, misses, split, with_kv)

    def check_state(self, bank_name: str, state: dict[str, torch.Tensor]) -> None:
        super().check_state(bank_name, state)
        hidden_size = self.controller.identity.get("hidden_size")
        for name, tensor in state.items():
            if name.endswith(".hidden") and (
                tensor.dim() != 2 or not tensor.is_floating_point() or (hidden_size and tensor.shape[-1] != hidden_size)
            ):
                raise ValueError(
                    f"{name!r} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; expected a "
                    f"floating (sequence, {hidden_size}) tensor."
                )
            if name.endswith((".key", ".value")) and (tensor.dim() < 2 or tensor.shape[0] != 1):
                raise ValueError(f"{name!r} has shape {tuple(tensor.shape)}; expected one row of key/value states.")

    @staticmethod
    def _usable(values: dict[str, torch.Tensor], hidden: torch.Tensor, with_kv: bool) -> bool:
        stored = values.get("hidden")
        if stored is None or tuple(stored.shape) != tuple(hidden.shape[1:]):
            return False
        return not with_kv or bool(values.get("kv_recorded", torch.tensor(False)))

    def store(
        self,
        run: StackRun,
        layer: CachedLayer,
        output: torch.Tensor,
        out_rows: list[int],
        rows: list[int] | None = None,
    ) -> None:
        """Store the last layer's output of the missed rows (``out_rows`` index ``output``; ``rows`` the batch)."""
        bank = self.banks[layer.stack]
        for out_row, row in zip(out_rows, rows if rows is not None else out_rows, strict=True):
            values = {"hidden": output[out_row], "kv_recorded": torch.tensor(run.with_kv)}
            for position, writes in run.writes.items():
                for i, w in enumerate(writes):
                    name = f"kv.{position}.{i}.{w.tag}.{w.layer_idx}"
                    values[f"{name}.key"], values[f"{name}.value"] = w.key[row : row + 1], w.value[row : row + 1]
            bank.put(values, digest=run.digests[row], cost=run.seconds_per_row)
