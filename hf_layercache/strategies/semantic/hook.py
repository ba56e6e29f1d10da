"""The layer hook: hands each cached layer's call to its reuse step, and computes the rows the step asks for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ...kv import KVWrite, cache_parameter, find_cache, record_kv_writes
from ...layers import same_rows, select_rows
from ...stats import CacheStats
from ..stack import LayerHook, StartRun
from .partial import KVCacheArgument, PartialRow, partial_call, plain_call
from .run import Compute, LayerSlot, SemanticRun
from .subbatch import Group, cut_columns, groups, shifted, span

ReuseStep = Callable[[LayerSlot, SemanticRun, dict[str, Any], torch.Tensor, Compute], torch.Tensor]
"""``step(slot, run, arguments, hidden, compute)``: the layer's output for the whole batch, serving the rows it can
and computing the others through ``compute`` (``StateStep``, ``ResidualStep`` or :func:`compute_every_row`)."""


def compute_every_row(
    slot: LayerSlot, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, compute: Compute
) -> torch.Tensor:
    """The step of a layer that never looks up: the ``probe`` fingerprint's layers, which key the rows on what they
    compute and so must compute it."""
    return compute(list(range(run.batch)))[0]


class SemanticLayerHook(LayerHook):
    """The hook on one cached layer: gives its ``step`` the layer's slot and a ``compute`` bound to this call.

    What it serves is the step's business; the hook only runs the original layer, on a sub-batch when the step asks
    for some rows, keeping the counters and the output structure the base class serves in.
    """

    def __init__(self, slot: LayerSlot, start_run: StartRun, counters: CacheStats, step: ReuseStep):
        super().__init__(slot.layer, slot.position, start_run, counters)
        self.slot = slot
        self.step = step
        self.cache_name = cache_parameter(slot.layer.module.forward) if slot.partial else None
        """Where a partial call puts its :class:`~.partial.KVCacheArgument` (``None``: the layer cannot)."""

    def forward_run(self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        return self.pack(self.step(self.slot, run, arguments, hidden, _LayerCompute(self, run, arguments, hidden)))

    def compute(
        self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, rows: list[int]
    ) -> tuple[torch.Tensor, list[KVWrite]]:
        """Run the layer on ``rows``; return the full-batch hidden state, with the input kept in the other rows,
        and the K/V writes it made. Some of the rows are computed in groups of similar length (:mod:`.subbatch`).

        A row repeating another row of ``rows`` with the same input here is not computed: it gets that row's output.
        """
        copies = self._copies(run, arguments, hidden, rows)
        if copies:
            full, writes = self.compute(run, arguments, hidden, [r for r in rows if r not in copies])
            for row, twin in copies.items():
                full[row] = full[twin]
            return full, writes
        start = time.perf_counter()
        capture = KVCacheArgument() if run.record_kv and self.cache_name is not None else None
        if capture is not None:  # the rows' K/V, for the entries they may become (see EntryStore)
            arguments = {**arguments, self.cache_name: capture}
        if len(rows) == run.batch:
            with record_kv_writes(find_cache(arguments) if run.with_kv else None) as writes:
                full = self._call(run, arguments, Group(rows, 0, hidden.shape[1]), capture)
        else:
            full, writes = hidden.clone(), []
            for group, group_arguments in self._groups(run, arguments, hidden, rows):
                computed = self._call(run, group_arguments, group, capture)
                full[torch.tensor(group.rows, device=hidden.device), group.start : group.stop] = computed.to(full.dtype)
        self.counters.record_compute(self.layer.name, len(rows), time.perf_counter() - start)
        return full, writes

    def _call(
        self, run: SemanticRun, arguments: dict[str, Any], group: Group, capture: KVCacheArgument | None
    ) -> torch.Tensor:
        """The layer's output for ``group``'s call, keeping what ``capture`` recorded of each of its rows."""
        out = self.original(**arguments)
        self.observe(out)
        if capture is not None and capture.key is not None:
            recorded = run.captured.setdefault(self.slot.position, {})
            for i, row in enumerate(group.rows):
                real = shifted(run.positions[row], group.start)
                recorded[row] = (capture.key[i][:, real], capture.value[i][:, real])
        return out[0] if isinstance(out, tuple) else out

    def _groups(
        self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, rows: list[int]
    ) -> list[tuple[Group, dict[str, Any]]]:
        """The calls that compute ``rows``: each group's rows on the columns they use, where the call allows it."""
        length, spec = hidden.shape[1], self.layer.spec
        whole = Group(rows, 0, length)
        if run.with_kv or not plain_call(arguments, spec, hidden):
            return [(whole, select_rows(arguments, spec, torch.tensor(rows, device=hidden.device), run.batch))]
        calls = []
        for group in groups(rows, {row: span(run.positions[row], length) for row in rows}):
            selected = select_rows(arguments, spec, torch.tensor(group.rows, device=hidden.device), run.batch)
            cut = cut_columns(selected, self.binder.first, group.start, group.stop)
            if cut is None:  # a mask of a shape whose sequence axes are unknown: every row at full length
                return [(whole, select_rows(arguments, spec, torch.tensor(rows, device=hidden.device), run.batch))]
            calls.append((group, cut))
        return calls

    def compute_tokens(
        self, arguments: dict[str, Any], hidden: torch.Tensor, plan: list[PartialRow]
    ) -> list[torch.Tensor]:
        """Run the layer on the tokens ``plan``'s rows compute alone, against their entries' K/V
        (:mod:`.partial`): each row's output at those tokens."""
        call = partial_call(hidden, plan)
        partial_arguments = {
            **arguments,
            self.binder.first: call.hidden,
            "attention_mask": call.mask,
            self.cache_name: call.cache,
        }
        try:
            out = self.original(**partial_arguments)
        except RuntimeError:  # the mask spans the entry's tokens too: a layer without them fails on it
            self._check_read(call.cache)
            raise
        self._check_read(call.cache)
        states = out[0] if isinstance(out, tuple) else out
        return [states[b, start : start + p.computed.numel()] for (b, start), p in zip(call.places, plan, strict=True)]

    def _check_read(self, cache: KVCacheArgument) -> None:
        """Entries record K/V only where the layer reads its KV-cache argument, so one that ignores it here holds
        entries from elsewhere (saved under another version of the model code)."""
        if cache.key is None:
            raise RuntimeError(
                f"semantic: {self.layer.name} ({type(self.layer.module).__name__}) ignored the KV-cache argument of a "
                "partial hit, so its added tokens cannot attend to the entry's; the entries' K/V were recorded by "
                "other model code. Load them with max_added=0, or clear the cache."
            )

    def _copies(
        self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, rows: list[int]
    ) -> dict[int, int]:
        """The twins among ``rows`` whose row they repeat is computed too, from the same input: same hidden state
        (an earlier layer may have served one and not the other) and same per-row arguments."""
        if not run.twins:
            return {}
        computing = set(rows)
        return {
            row: twin
            for row, twin in run.twins.items()
            if row in computing and twin in computing and same_rows(arguments, hidden, self.layer.spec, row, twin)
        }


class _LayerCompute:
    """:class:`~.run.Compute` for one call of a hooked layer."""

    def __init__(self, hook: SemanticLayerHook, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor):
        self.hook, self.run, self.arguments, self.hidden = hook, run, arguments, hidden

    def __call__(self, rows: list[int]) -> tuple[torch.Tensor, list[KVWrite]]:
        return self.hook.compute(self.run, self.arguments, self.hidden, rows)

    def tokens(self, plan: list[PartialRow]) -> list[torch.Tensor]:
        return self.hook.compute_tokens(self.arguments, self.hidden, plan)
