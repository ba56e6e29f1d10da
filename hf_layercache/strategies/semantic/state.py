"""State reuse (``reuse="state"``, the default): a row jumps to the deepest layer with a similar entry, passing
through the layers before it, and takes the stored state there; plus which layers can be jumped to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...bank import CacheBank
from ...fingerprints import Fingerprint
from ...kv import find_cache, replay_kv_writes
from ...layers import rows_splittable
from .alignment import on_device
from .entries import source_digest
from .run import SemanticRun, Target
from .search import _TOLERANCE

if TYPE_CHECKING:
    from ...config import LayerCacheConfig
    from ...controller import LayerCacheController
    from .hook import SemanticLayerHook


class StateReuse:
    """The part of :class:`~.strategy.SemanticStrategy` that serves ``reuse="state"``: jump targets and K/V of the
    layers a row skips.

    A mixin: the strategy sets these attributes in ``__init__`` and ``attach``; it uses the strategy's search
    (:mod:`.search`), verification and storing.
    """

    controller: LayerCacheController
    config: LayerCacheConfig
    banks: dict[str, CacheBank]
    fingerprint: Fingerprint
    _hooks: list[SemanticLayerHook]
    _jump_targets: set[str]

    def _find_jump_targets(self) -> set[str]:
        """State reuse: the layers a row can jump to. A row takes the deepest layer with a usable entry and every
        such layer holds the same inputs under the same key, so a shallower layer only catches rows all deeper ones
        missed when its threshold is lower than theirs: with one threshold, the last layer alone. Only these layers
        store and search entries, unless a KV cache needs the K/V of every layer a row skips."""
        targets = set()
        for stack in {hook.layer.stack for hook in self._hooks}:
            lowest_deeper = float("inf")
            for hook in reversed(self._stack_hooks(stack)):
                threshold = self.config.threshold_for(hook.rank)
                if hook.position >= self.fingerprint.after_layers and threshold < lowest_deeper:
                    targets.add(hook.layer.name)
                lowest_deeper = min(lowest_deeper, threshold)
        return targets

    def _stack_hooks(self, stack: str) -> list[SemanticLayerHook]:
        return [hook for hook in self._hooks if hook.layer.stack == stack]

    # --- state reuse ----------------------------------------------------------------------------------------------
    def state_step(
        self, hook: SemanticLayerHook, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> torch.Tensor:
        """Rows jump to the deepest layer with a similar entry: pass through until there, take its state there."""
        if hook.position == self.fingerprint.after_layers:
            run.keys = self.key(run, hidden)
            run.targets = self._targets(hook, run, arguments)
        live = {r: t for r, t in run.targets.items() if not t.candidate.verify}
        passing = [r for r, t in live.items() if t.position > hook.position]
        serving = {r: t.candidate for r, t in live.items() if t.position == hook.position}
        compute_rows = [r for r in range(run.batch) if r not in passing and r not in serving]
        if compute_rows:
            out, writes = hook.compute(run, arguments, hidden, compute_rows)
            verified = {r: t.candidate for r, t in run.targets.items() if t.candidate.verify}
            here = {r: c for r, c in verified.items() if run.targets[r].position == hook.position}
            self._check(hook, run, here, hidden, out, "state")  # before storing: see residual_step
            if run.with_kv or hook.layer.name in self._jump_targets:
                self._store(hook, run, run.keys, out, hidden, compute_rows, writes, "state")
        else:
            out = hidden.clone()
        for row, candidate in serving.items():
            pos = on_device(run.positions[row], hidden.device)
            state = candidate.values["state"].to(device=hidden.device, dtype=hidden.dtype)
            out[row, pos] = state[on_device(candidate.index, state.device)]
        for row in [*passing, *serving]:
            run.exact[row] = False
        if run.with_kv and not compute_rows:  # every row skips or is served here (see _targets)
            replay_kv_writes(find_cache(arguments), self._batch_writes(run, self._kv_sources(hook, run)))
        self.controller.stats_.record(hook.layer.name, hits=len(passing) + len(serving))
        return out

    def _targets(self, hook: SemanticLayerHook, run: SemanticRun, arguments: dict[str, Any]) -> dict[int, Target]:
        """For each row, the deepest cached layer of the stack with a usable entry (searched deepest first)."""
        targets: dict[int, Target] = {}
        searching = list(range(run.batch))
        deepest_first = [
            deeper
            for deeper in reversed(self._stack_hooks(hook.layer.stack)[hook.position :])
            if run.with_kv or deeper.layer.name in self._jump_targets
        ]
        for i, deeper in enumerate(deepest_first):
            found, best = self.find(deeper, run, run.keys, searching, "state")
            for row, candidate in found.items():
                targets[row] = Target(deeper.position, candidate)
                self.banks[deeper.layer.name].record_hit(candidate.entry_id, candidate.score)
            # Banks hold the same inputs under the same keys, so a row whose best similarity is below every
            # remaining threshold would miss there too: stop searching for it (at worst a miss, never a wrong hit).
            lowest = min((self.config.threshold_for(h.rank) for h in deepest_first[i + 1 :]), default=2.0)
            searching = [r for r in searching if r not in found and best.get(r, 1.0) >= lowest - _TOLERANCE]
            if not searching:
                break
        for _ in range(run.batch - len(targets)):
            self.banks[hook.layer.name].record_miss()
        uniform = len(targets) == run.batch and len({t.position for t in targets.values()}) == 1
        if targets and not uniform and (run.with_kv or not rows_splittable(arguments, hook.layer.spec, run.batch)):
            return {}
        if run.with_kv and targets and not self._kv_available(hook, targets):
            return {}
        chosen = self._choose(hook, run, arguments, {r: t.candidate for r, t in targets.items()})
        return {r: targets[r] for r in chosen}

    def _kv_available(self, hook: SemanticLayerHook, targets: dict[int, Target]) -> bool:
        """A row that skips layers must find their recorded K/V: its source's entry in each skipped bank."""
        for target in targets.values():
            source = source_digest(target.candidate.values)
            for skipped in self._stack_hooks(hook.layer.stack)[hook.position : target.position]:
                if self.banks[skipped.layer.name].find(source) is None:
                    return False
        return True

    def _kv_sources(self, hook: SemanticLayerHook, run: SemanticRun) -> list[dict[str, torch.Tensor]]:
        """The entries whose K/V this layer replays: each row's source entry in this layer's bank."""
        bank = self.banks[hook.layer.name]
        out = []
        for row in range(run.batch):
            target = run.targets[row]
            if target.position == hook.position:
                out.append(target.candidate.values)
                continue
            entry_id = bank.find(source_digest(target.candidate.values))
            values = bank.get(entry_id) if entry_id is not None else None
            if values is None:
                raise RuntimeError(
                    f"semantic: the K/V of {hook.layer.name} for a skipped row were evicted mid-request."
                )
            out.append(values)
        return out
