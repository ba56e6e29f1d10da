"""The ``exact`` strategy class: banks per stack, the lookup that opens a run, and storing the missed rows."""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ...bank import Lookup
from ...kv import KVWrite, find_cache, past_length
from ...layers import CachedLayer, rows_splittable
from ...registry import register_strategy
from ...request import RequestScope, namespace_tag
from ..base import StackStrategy
from .digests import RowKey, row_keys
from .entry import ExactEntry
from .hook import ExactLayerHook, StackRun
from .request import BANK, RequestEntry, RequestPath

_ROWS = "exact.rows"


@register_strategy("exact")
class ExactStrategy(StackStrategy):
    """Lossless: identical requests skip every cached layer; outputs equal uncached ones bit for bit."""

    intermediate_states_exact = False

    config_fields = ("shared_store", "shared_store_kwargs", "verify_fraction")  # checked by the config / semantic

    def attach(self) -> None:
        self.stacks: dict[str, list[CachedLayer]] = {}
        for layer in self.layers:
            self.stacks.setdefault(layer.stack, []).append(layer)
        for stack, layers in self.stacks.items():
            positions = [layer.index_in_stack for layer in layers]
            if positions != list(range(positions[0], positions[0] + len(positions))):
                raise ValueError(
                    f"strategy='exact' skips a contiguous run of layers, but the layers selected in {stack!r} are "
                    f"{positions}; select a contiguous range."
                )
            self.new_bank(stack, layers[-1].device, n_banks=len(self.stacks) + 1)
        request_bank = self.new_bank(BANK, self.layers[-1].device, n_banks=len(self.stacks) + 1)
        self.request_path = RequestPath(request_bank, self.controller.model)
        self._draws = random.Random(0)  # which hits verify_fraction checks; seeded, so runs repeat
        self._warned_disagreement = False
        for layers in self.stacks.values():
            for position, layer in enumerate(layers):
                self.hooks.replace_forward(
                    layer.module, ExactLayerHook(self, layer, position, last=position == len(layers) - 1)
                )

    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:
        # one stack runs over the input: rows are keyed on their real tokens; an encoder-decoder keys its layouts
        scope.state[_ROWS] = row_keys(arguments, scope.namespace, layout_free=len(self.stacks) == 1)

    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """A call whose every row was answered before in the same layout is answered from the request bank
        (:mod:`.request`), without running the model; any other runs, its output kept for next time."""
        keys: list[RowKey] | None = scope.state.get(_ROWS)
        signature = self.request_path.signature(arguments, scope.head_key) if keys else None
        if signature is None:
            return original(**arguments)
        verifying = self.verify_fraction > 0 and self._draws.random() < self.verify_fraction
        served = None if verifying else self.request_path.serve(keys, scope.namespace, signature)
        if served is not None:
            output, lookup = served
            self.controller.record_lookup(lookup, self.request_path.bank, [layer.name for layer in self.layers])
            return output
        output = original(**arguments)
        self.request_path.store(keys, scope.namespace, signature, output)
        return output

    def saved_banks(self) -> list[str]:
        return [name for name in self.banks if name != BANK]  # the request bank refills from the stacks' entries

    def banks_replaced(self) -> None:
        self.request_path.clear()

    def heads_changed(self) -> None:
        self.request_path.clear()  # whole-model outputs; the stacks' entries stay valid

    def start_run(
        self, scope: RequestScope, layer: CachedLayer, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> StackRun | None:
        """Look every row up in the stack's bank; ``None`` when this call cannot use the cache."""
        request_keys: list[RowKey] | None = scope.state.get(_ROWS)
        cache = find_cache(arguments)
        if not request_keys or len(request_keys) != hidden.shape[0] or past_length(cache) > 0 or hidden.dim() < 2:
            return None  # nothing to key on (or an empty batch), or a decode step
        keys = [key.for_stack(hidden.shape[1]) for key in request_keys]
        if any(key.length != hidden.shape[1] for key in keys):
            return None  # the stack does not run over the input's tokens one to one
        bank = self.banks[layer.stack]
        namespace = namespace_tag(scope.namespace)
        with_kv = cache is not None and arguments.get("use_cache", True) is not False
        digests = [hashlib.blake2b(key.digest + layer.stack.encode(), digest_size=32).digest() for key in keys]
        if self.controller.shared is not None:  # local misses may be in the replicas' Redis: one round trip
            self.controller.shared.fill(
                bank, digests, namespace, lambda _digest, values: self.check_entry(layer.stack, values)
            )
        found: dict[int, tuple[int, ExactEntry]] = {}
        for row, digest in enumerate(digests):
            entry_id = bank.find(digest)
            values = bank.get(entry_id, namespace) if entry_id is not None else None
            if values is not None:
                entry = ExactEntry.from_tensors(values)
                if self._fits(entry, keys[row], hidden) and (entry.kv_recorded or not with_kv):
                    found[row] = (entry_id, entry)
        audits = {row: found.pop(row) for row in list(found) if self._draws.random() < self.verify_fraction}
        split = not with_kv and rows_splittable(arguments, layer.spec, len(digests))
        if found and len(found) < len(digests) and not split:
            found = {}  # the layers cannot compute a sub-batch: every row computes
        misses = [row for row in range(len(digests)) if row not in found]
        lookup = Lookup(served=[(entry_id, 1.0) for entry_id, _ in found.values()], missed=len(misses))
        self.controller.record_lookup(lookup, bank, [cached.name for cached in self.stacks[layer.stack]])
        hits = {row: entry for row, (_, entry) in found.items()}
        return StackRun(digests, keys, hits, misses, split, with_kv, namespace, audits=audits)

    def _audit(self, layer: CachedLayer, audit: tuple[int, ExactEntry], key: RowKey, computed: torch.Tensor) -> bool:
        """Whether a hit drawn for verification holds what the layer just computed for it. One that does not (a
        poisoned or stale entry) is dropped, so the computed output replaces it, and is reported."""
        entry_id, entry = audit
        same_layout = entry.layout == key.layout
        stored = (entry.hidden if same_layout else entry.hidden[entry.real]).float()
        fresh = (computed if same_layout else computed[key.columns]).float()
        stored = stored.to(fresh.device)
        agrees = stored.shape == fresh.shape and torch.allclose(stored, fresh, rtol=1e-4, atol=1e-5)
        error = ((stored - fresh).norm() / fresh.norm().clamp_min(1e-12)).item() if stored.shape == fresh.shape else 1.0
        self.controller.stats_.record_error(layer.name, error, acceptable=agrees, explored=False)
        if not agrees:
            self.banks[layer.stack].remove(entry_id)
            if not self._warned_disagreement:
                self._warned_disagreement = True
                warnings.warn(
                    f"An exact cache entry of {layer.stack!r} disagrees with the layer it stands for (relative error "
                    f"{error:.3g}): it was dropped and the computed output served. Entries loaded from an unsigned "
                    "warm cache may have been altered; see integrity_key in docs/reliability.md.",
                    stacklevel=2,
                )
        return agrees

    @staticmethod
    def _fits(entry: ExactEntry, key: RowKey, hidden: torch.Tensor) -> bool:
        """An entry of the row's number of real tokens and the model's width (the digest says the rest)."""
        return entry.layout[2] == key.layout[2] and entry.hidden.shape[-1] == hidden.shape[-1]

    def check_entry(self, bank_name: str, values: dict[str, torch.Tensor]) -> None:
        if bank_name == BANK:  # a copied model's request bank (copy.deepcopy); warm caches do not save it
            RequestEntry.validate(values)
            return
        ExactEntry.validate(values, hidden_size=self.controller.spec.hidden_size)

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
            key = run.keys[row]
            if row in run.audits and self._audit(layer, run.audits[row], key, output[out_row]):
                continue  # the stored entry reproduced the layer: keep it (and its place in the policy)
            real = key.columns if key.free else slice(None)  # a layout-bound row keeps its writes whole
            writes = {
                position: [
                    KVWrite(w.tag, w.layer_idx, w.key[row : row + 1, :, real], w.value[row : row + 1, :, real])
                    for w in writes
                ]
                for position, writes in run.writes.items()
            }
            entry = ExactEntry(output[out_row], key.layout, run.with_kv, writes)
            entry_id = bank.put(
                entry.to_tensors(), digest=run.digests[row], cost=run.seconds_per_row, namespace=run.namespace
            )
            if self.controller.shared is not None:  # written to the replicas' Redis in the background
                self.controller.shared.write(bank, entry_id, run.digests[row], run.namespace, run.seconds_per_row)
