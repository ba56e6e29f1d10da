"""State reuse (``reuse="state"``, the default): a row jumps to the deepest layer with a similar entry, passing
through the layers before it, and takes the stored state there; plus which layers can be jumped to."""

from __future__ import annotations

from typing import Any

import torch

from ...config import LayerCacheConfig
from ...events import Lookup
from ...kv import find_cache, replay_kv_writes
from ...layers import rows_splittable
from .alignment import on_device, take
from .entries import SemanticEntry
from .partial import PartialRow, RecordingGate, padded_positions, plain_call
from .parts import ReuseParts
from .run import Compute, LayerSlot, SemanticRun, Target
from .search import SIMILARITY_TOLERANCE
from .store import batch_writes


class StateStep:
    """Serves one cached layer of a run under ``reuse="state"``.

    The stack's first looked-up layer (``after_layers``: the fingerprint's probe computes the ones before) keys the
    rows once and picks each row's jump target; every layer of the stack then passes rows through, serves them the
    stored state, or computes them, and replays the recorded K/V of the layers a row skips. ``stacks`` are the
    cached layers of each stack in order; ``config`` is read at every call (thresholds).
    """

    def __init__(
        self,
        stacks: dict[str, list[LayerSlot]],
        after_layers: int,
        config: LayerCacheConfig,
        parts: ReuseParts,
    ):
        self.stacks = stacks
        self.after_layers = after_layers
        self.config = config
        self.run_builder, self.search, self.verifier = parts.run_builder, parts.search, parts.verifier
        self.entry_store, self.banks, self.record_lookup = parts.entry_store, parts.banks, parts.record_lookup
        self.jump_targets = self._find_jump_targets()
        self.recording = RecordingGate()
        """Whether computed rows record their K/V for partial hits (see :class:`~.partial.RecordingGate`)."""

    def _find_jump_targets(self) -> set[str]:
        """The layers a row can jump to. A row takes the deepest layer with a usable entry and every such layer holds
        the same inputs under the same key, so a shallower layer only catches rows all deeper ones missed when its
        threshold is lower than theirs: with one threshold, the last layer alone. Only these layers store and search
        entries, unless a KV cache needs the K/V of every layer a row skips."""
        targets = set()
        for slots in self.stacks.values():
            lowest_deeper = float("inf")
            for slot in reversed(slots):
                threshold = self.config.threshold_for(slot.rank)
                if slot.position >= self.after_layers and threshold < lowest_deeper:
                    targets.add(slot.layer.name)
                lowest_deeper = min(lowest_deeper, threshold)
        return targets

    def __call__(
        self, slot: LayerSlot, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, compute: Compute
    ) -> torch.Tensor:
        """Rows jump to the deepest layer with a similar entry: pass through until there, take its state there."""
        if slot.position == self.after_layers:
            run.partial = self._partial_possible(slot, run, arguments, hidden)
            run.record_kv = run.partial and self.recording.open
            run.keys = self.run_builder.key(run, hidden)
            run.targets = self._targets(slot, run, arguments)
            self.recording.observe(len(run.targets), run.batch)
            self._record_jumps(slot, run)
        live = {r: t for r, t in run.targets.items() if not t.candidate.verify}
        passing = [r for r, t in live.items() if t.position > slot.position]
        serving = {r: t.candidate for r, t in live.items() if t.position == slot.position}
        partial = [r for r in [*passing, *serving] if live[r].candidate.computed is not None]
        added = self._compute_added(slot, run, hidden, compute, partial) if partial else {}
        compute_rows = [r for r in range(run.batch) if r not in passing and r not in serving]
        if compute_rows:
            out, writes = compute(compute_rows)
            verified = {r: t.candidate for r, t in run.targets.items() if t.candidate.verify}
            here = {r: c for r, c in verified.items() if run.targets[r].position == slot.position}
            self.verifier.check(run, here, hidden, out)  # before storing: see ResidualStep
            if run.with_kv or slot.layer.name in self.jump_targets:
                kv_layers = range(self.after_layers, slot.position + 1) if run.record_kv else None
                self.entry_store.store(slot, run, run.keys, out, hidden, compute_rows, writes, "state", kv_layers)
        else:
            out = hidden.clone()
        for row, candidate in serving.items():
            pos = on_device(run.positions[row], hidden.device)
            state = candidate.entry.value.to(device=hidden.device, dtype=hidden.dtype)
            out[row, pos] = take(state, candidate.index)
        for row, (where, states) in added.items():
            out[row, where] = states.to(out.dtype)
        for row in [*passing, *serving]:
            run.exact[row] = False
        if run.with_kv and not compute_rows:  # every row skips or is served here (see _targets)
            replay_kv_writes(find_cache(arguments), batch_writes(run, self._kv_sources(slot, run)))
        return out

    def _partial_possible(
        self, slot: LayerSlot, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> bool:
        """Whether this run may serve rows in part (see ``SemanticRun.partial``)."""
        if run.with_kv or self.config.max_added <= 0:
            return False
        slots = self.stacks[slot.layer.stack][slot.position :]
        return all(s.partial for s in slots) and plain_call(arguments, slot.layer.spec, hidden)

    def _compute_added(
        self, slot: LayerSlot, run: SemanticRun, hidden: torch.Tensor, compute: Compute, rows: list[int]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """This layer's output at the tokens computed for the rows served in part, by row: their positions in the
        batch and their states, computed against each entry's K/V here."""
        plan = []
        for row in rows:
            candidate = run.targets[row].candidate
            kv = candidate.entry.attention_kv[slot.position - self.after_layers]
            where = padded_positions(run.positions[row], candidate.computed).to(hidden.device)
            plan.append(PartialRow(row, where, kv[0], kv[1], candidate.replaced))
        return {p.row: (p.computed, states) for p, states in zip(plan, compute.tokens(plan), strict=True)}

    def _record_jumps(self, slot: LayerSlot, run: SemanticRun) -> None:
        """The lookup's outcome, once: a row served at layer ``t`` hits in every layer from here to ``t`` (they pass
        it through; ``t``'s bank served it) and computes after ``t``; a row without a target computes everywhere."""
        layers = self.stacks[slot.layer.stack][slot.position :]
        live = {r: t for r, t in run.targets.items() if not t.candidate.verify}
        for target_slot in layers:
            here = {r: t.candidate for r, t in live.items() if t.position == target_slot.position}
            if here:
                jumped = [s.layer.name for s in layers if s.position <= target_slot.position]
                served = [(c.entry_id, c.score) for c in here.values()]
                partial = [c.computed.numel() / run.lengths[r] for r, c in here.items() if c.computed is not None]
                lookup = Lookup(served, partial=partial)
                self.record_lookup(lookup, self.banks[target_slot.layer.name], jumped)
                computed_after = [s.layer.name for s in layers if s.position > target_slot.position]
                self.record_lookup(Lookup(missed=len(here)), None, computed_after)
        missed = Lookup(missed=run.batch - len(live))
        self.record_lookup(missed, self.banks[slot.layer.name], [s.layer.name for s in layers])

    def _targets(self, slot: LayerSlot, run: SemanticRun, arguments: dict[str, Any]) -> dict[int, Target]:
        """For each row, the deepest cached layer of the stack with a usable entry (searched deepest first)."""
        targets: dict[int, Target] = {}
        searching = list(range(run.batch))
        deepest_first = [
            deeper
            for deeper in reversed(self.stacks[slot.layer.stack][slot.position :])
            if run.with_kv or deeper.layer.name in self.jump_targets
        ]
        for i, deeper in enumerate(deepest_first):
            found, best = self.search.find(deeper, run, run.keys, searching, "state")
            for row, candidate in found.items():
                targets[row] = Target(deeper.position, candidate)
            # Banks hold the same inputs under the same keys, so a row whose best similarity is below every
            # remaining threshold would miss there too: stop searching for it (at worst a miss, never a wrong hit).
            lowest = min(
                (self.search.floor(run, self.config.threshold_for(s.rank)) for s in deepest_first[i + 1 :]),
                default=2.0,
            )
            searching = [r for r in searching if r not in found and best.get(r, 1.0) >= lowest - SIMILARITY_TOLERANCE]
            if not searching:
                break
        uniform = len(targets) == run.batch and len({t.position for t in targets.values()}) == 1
        if targets and not uniform and (run.with_kv or not rows_splittable(arguments, slot.layer.spec, run.batch)):
            return {}
        if run.with_kv and targets and not self._kv_available(slot, targets):
            return {}
        chosen = self.search.choose(slot, run, arguments, {r: t.candidate for r, t in targets.items()})
        return {r: targets[r] for r in chosen}

    def _kv_available(self, slot: LayerSlot, targets: dict[int, Target]) -> bool:
        """A row that skips layers must find their recorded K/V: its source's entry in each skipped bank."""
        for target in targets.values():
            for skipped in self.stacks[slot.layer.stack][slot.position : target.position]:
                if self.banks[skipped.layer.name].find(target.candidate.entry.source) is None:
                    return False
        return True

    def _kv_sources(self, slot: LayerSlot, run: SemanticRun) -> list[SemanticEntry]:
        """The entries whose K/V this layer replays: each row's source entry in this layer's bank."""
        bank = self.banks[slot.layer.name]
        out = []
        for row in range(run.batch):
            target = run.targets[row]
            if target.position == slot.position:
                out.append(target.candidate.entry)
                continue
            entry_id = bank.find(target.candidate.entry.source)
            entry = bank.get(entry_id) if entry_id is not None else None
            if entry is None:
                raise RuntimeError(
                    f"semantic: the K/V of {slot.layer.name} for a skipped row were evicted mid-request."
                )
            out.append(entry)
        return out
