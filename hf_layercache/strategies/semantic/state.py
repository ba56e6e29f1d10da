"""State reuse (``reuse="state"``, the default): a row jumps to the deepest layer with a similar entry, passing
through the layers before it, and takes the stored state there; plus which layers can be jumped to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...bank import CacheBank, Lookup
from ...fingerprints import Fingerprint
from ...kv import find_cache, replay_kv_writes
from ...layers import rows_splittable
from .alignment import on_device
from .entries import SemanticEntry
from .run import Compute, LayerSlot, SemanticRun, Target
from .search import _TOLERANCE

if TYPE_CHECKING:
    from ...config import LayerCacheConfig
    from ..base import StrategyContext


class StateReuse:
    """The part of :class:`~.strategy.SemanticStrategy` that serves ``reuse="state"``: jump targets and K/V of the
    layers a row skips.

    A mixin: the strategy sets these attributes in ``__init__`` and ``attach``; it uses the strategy's search
    (:mod:`.search`), verification and storing.
    """

    context: StrategyContext
    config: LayerCacheConfig
    banks: dict[str, CacheBank]
    fingerprint: Fingerprint
    slots: list[LayerSlot]
    _jump_targets: set[str]

    def _find_jump_targets(self) -> set[str]:
        """State reuse: the layers a row can jump to. A row takes the deepest layer with a usable entry and every
        such layer holds the same inputs under the same key, so a shallower layer only catches rows all deeper ones
        missed when its threshold is lower than theirs: with one threshold, the last layer alone. Only these layers
        store and search entries, unless a KV cache needs the K/V of every layer a row skips."""
        targets = set()
        for stack in {slot.layer.stack for slot in self.slots}:
            lowest_deeper = float("inf")
            for slot in reversed(self._stack_slots(stack)):
                threshold = self.config.threshold_for(slot.rank)
                if slot.position >= self.fingerprint.after_layers and threshold < lowest_deeper:
                    targets.add(slot.layer.name)
                lowest_deeper = min(lowest_deeper, threshold)
        return targets

    def _stack_slots(self, stack: str) -> list[LayerSlot]:
        return [slot for slot in self.slots if slot.layer.stack == stack]

    # --- state reuse ----------------------------------------------------------------------------------------------
    def state_step(
        self, slot: LayerSlot, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, compute: Compute
    ) -> torch.Tensor:
        """Rows jump to the deepest layer with a similar entry: pass through until there, take its state there."""
        if slot.position == self.fingerprint.after_layers:
            run.keys = self.key(run, hidden)
            run.targets = self._targets(slot, run, arguments)
            self._record_jumps(slot, run)
        live = {r: t for r, t in run.targets.items() if not t.candidate.verify}
        passing = [r for r, t in live.items() if t.position > slot.position]
        serving = {r: t.candidate for r, t in live.items() if t.position == slot.position}
        compute_rows = [r for r in range(run.batch) if r not in passing and r not in serving]
        if compute_rows:
            out, writes = compute(compute_rows)
            verified = {r: t.candidate for r, t in run.targets.items() if t.candidate.verify}
            here = {r: c for r, c in verified.items() if run.targets[r].position == slot.position}
            self._check(slot, run, here, hidden, out)  # before storing: see residual_step
            if run.with_kv or slot.layer.name in self._jump_targets:
                self._store(slot, run, run.keys, out, hidden, compute_rows, writes, "state")
        else:
            out = hidden.clone()
        for row, candidate in serving.items():
            pos = on_device(run.positions[row], hidden.device)
            state = candidate.entry.value.to(device=hidden.device, dtype=hidden.dtype)
            out[row, pos] = state[on_device(candidate.index, state.device)]
        for row in [*passing, *serving]:
            run.exact[row] = False
        if run.with_kv and not compute_rows:  # every row skips or is served here (see _targets)
            replay_kv_writes(find_cache(arguments), self._batch_writes(run, self._kv_sources(slot, run)))
        return out

    def _record_jumps(self, slot: LayerSlot, run: SemanticRun) -> None:
        """The lookup's outcome, once: a row served at layer ``t`` hits in every layer from here to ``t`` (they pass
        it through; ``t``'s bank served it) and computes after ``t``; a row without a target computes everywhere."""
        layers = self._stack_slots(slot.layer.stack)[slot.position :]
        live = {r: t for r, t in run.targets.items() if not t.candidate.verify}
        for target_slot in layers:
            here = [t.candidate for t in live.values() if t.position == target_slot.position]
            if here:
                jumped = [s.layer.name for s in layers if s.position <= target_slot.position]
                lookup = Lookup([(c.entry_id, c.score) for c in here])
                self.context.record_lookup(lookup, self.banks[target_slot.layer.name], jumped)
                computed_after = [s.layer.name for s in layers if s.position > target_slot.position]
                self.context.record_lookup(Lookup(missed=len(here)), None, computed_after)
        missed = Lookup(missed=run.batch - len(live))
        self.context.record_lookup(missed, self.banks[slot.layer.name], [s.layer.name for s in layers])

    def _targets(self, slot: LayerSlot, run: SemanticRun, arguments: dict[str, Any]) -> dict[int, Target]:
        """For each row, the deepest cached layer of the stack with a usable entry (searched deepest first)."""
        targets: dict[int, Target] = {}
        searching = list(range(run.batch))
        deepest_first = [
            deeper
            for deeper in reversed(self._stack_slots(slot.layer.stack)[slot.position :])
            if run.with_kv or deeper.layer.name in self._jump_targets
        ]
        for i, deeper in enumerate(deepest_first):
            found, best = self.find(deeper, run, run.keys, searching, "state")
            for row, candidate in found.items():
                targets[row] = Target(deeper.position, candidate)
            # Banks hold the same inputs under the same keys, so a row whose best similarity is below every
            # remaining threshold would miss there too: stop searching for it (at worst a miss, never a wrong hit).
            lowest = min((self.config.threshold_for(s.rank) for s in deepest_first[i + 1 :]), default=2.0)
            searching = [r for r in searching if r not in found and best.get(r, 1.0) >= lowest - _TOLERANCE]
            if not searching:
                break
        uniform = len(targets) == run.batch and len({t.position for t in targets.values()}) == 1
        if targets and not uniform and (run.with_kv or not rows_splittable(arguments, slot.layer.spec, run.batch)):
            return {}
        if run.with_kv and targets and not self._kv_available(slot, targets):
            return {}
        chosen = self._choose(slot, run, arguments, {r: t.candidate for r, t in targets.items()})
        return {r: targets[r] for r in chosen}

    def _kv_available(self, slot: LayerSlot, targets: dict[int, Target]) -> bool:
        """A row that skips layers must find their recorded K/V: its source's entry in each skipped bank."""
        for target in targets.values():
            for skipped in self._stack_slots(slot.layer.stack)[slot.position : target.position]:
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
