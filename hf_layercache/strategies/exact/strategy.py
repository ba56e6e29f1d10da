"""The ``exact`` strategy: banks per stack, the request path, and the lookup that opens a stack's run.

A request: :meth:`ExactStrategy.begin_request` keys every row (:mod:`.digests`); :meth:`ExactStrategy.forward_request`
answers a call whose every row was seen in the same layout from the whole-output bank (:mod:`.outputs`), else runs
the model; in it, each stack's first cached layer calls :meth:`ExactStrategy.start_run` (one lookup for the stack),
the layer hooks (:mod:`.hook`) serve the hit rows and compute the missed ones, and the last hands those to the
:class:`~.store.RowStore`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

import torch

from ...events import Lookup
from ...kv import find_cache, past_length
from ...layers import CachedLayer, rows_splittable
from ...registry import register_strategy
from ...request import RequestScope, namespace_tag
from ..stack import StackStrategy
from .config import ExactConfig
from .digests import RowKey, RowKeyMemo
from .entry import ExactEntry
from .hook import ExactLayerHook
from .outputs import BANK, RequestEntry, RequestPath
from .run import StackRun
from .store import RowStore

_ROWS = "exact.rows"


@register_strategy("exact")
class ExactStrategy(StackStrategy):
    """Lossless: identical requests skip every cached layer; outputs equal uncached ones bit for bit."""

    config_class = ExactConfig
    lossless = True
    tolerance = 1e-5
    shares_entries = True
    intermediate_states_exact = False

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
        n_banks = len(self.stacks) + 1
        hidden_size = self.context.spec.hidden_size
        self.stores: dict[str, RowStore] = {}
        for stack, layers in self.stacks.items():
            bank = self.new_bank(
                stack,
                layers[-1].device,
                n_banks,
                ExactEntry,
                expected={"hidden_size": hidden_size},
                digests_required=True,
            )
            self.stores[stack] = RowStore(bank, self.context.shared, self.context.record_verdict)
        request_bank = self.new_bank(BANK, self.layers[-1].device, n_banks, RequestEntry)
        self.request_path = RequestPath(request_bank, self.context.model)
        self._layer_names = [layer.name for layer in self.layers]  # what a served call is counted under
        self._draws = random.Random(0)  # which hits verify_fraction checks; seeded, so runs repeat
        # one stack runs over the input: rows are keyed on their real tokens; an encoder-decoder keys its layouts
        self._row_keys = RowKeyMemo(layout_free=len(self.stacks) == 1)
        for stack, layers in self.stacks.items():
            for position, layer in enumerate(layers):
                last = position == len(layers) - 1
                hook = ExactLayerHook(layer, position, last, self.start_run, self.context.counters, self.stores[stack])
                self.hooks.replace_forward(layer.module, hook)

    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:
        scope.state[_ROWS] = self._row_keys.row_keys(arguments, scope.namespace)

    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """A call whose every row was answered before in the same layout is answered from the request bank
        (:mod:`.outputs`), without running the model; any other runs, its output kept for next time."""
        keys: list[RowKey] | None = scope.state.get(_ROWS)
        signature = self.request_path.signature(arguments, scope.head_key) if keys else None
        if signature is None:
            return original(**arguments)
        verifying = self.verify_fraction > 0 and self._draws.random() < self.verify_fraction
        served = None if verifying else self.request_path.serve(keys, scope.namespace, signature)
        if served is not None:
            output, lookup = served
            self.context.record_lookup(lookup, self.request_path.bank, self._layer_names)
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
        if self.context.shared is not None:  # local misses may be in the replicas' Redis: one round trip
            self.context.shared.fill(bank, digests, namespace)
        found: dict[int, tuple[int, ExactEntry]] = {}
        for row, digest in enumerate(digests):
            hit = bank.find_entry(digest, namespace)
            if hit is not None and self._fits(hit[1], keys[row], hidden) and (hit[1].kv_recorded or not with_kv):
                found[row] = hit
        audits = {row: found.pop(row) for row in list(found) if self._draws.random() < self.verify_fraction}
        split = not with_kv and rows_splittable(arguments, layer.spec, len(digests))
        if found and len(found) < len(digests) and not split:
            found = {}  # the layers cannot compute a sub-batch: every row computes
        misses = [row for row in range(len(digests)) if row not in found]
        twins = _twins(misses, digests, keys) if split else {}
        misses = [row for row in misses if row not in twins]
        lookup = Lookup(served=[(entry_id, 1.0) for entry_id, _ in found.values()], missed=len(misses))
        units = (len(found) + len(twins), len(misses))  # a twin is answered without computing it: a hit
        self.context.record_lookup(lookup, bank, [cached.name for cached in self.stacks[layer.stack]], units)
        hits = {row: entry for row, (_, entry) in found.items()}
        return StackRun(digests, keys, hits, misses, split, with_kv, namespace, audits=audits, twins=twins)

    @staticmethod
    def _fits(entry: ExactEntry, key: RowKey, hidden: torch.Tensor) -> bool:
        """An entry of the row's number of real tokens and the model's width (the digest says the rest)."""
        return entry.layout[2] == key.layout[2] and entry.hidden.shape[-1] == hidden.shape[-1]


def _twins(misses: list[int], digests: list[bytes], keys: list[RowKey]) -> dict[int, int]:
    """The missed rows that repeat an earlier missed row of the same batch (same digest, same layout), by that row:
    a batch with one text twice computes it once."""
    first: dict[tuple[bytes, tuple[int, int, int]], int] = {}
    twins = {}
    for row in misses:
        seen = first.setdefault((digests[row], keys[row].layout), row)
        if seen != row:
            twins[row] = seen
    return twins
