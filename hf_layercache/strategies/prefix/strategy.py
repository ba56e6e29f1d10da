"""``PrefixStrategy``: the model gate, the suffix call, gathering and splicing the prefix, storing, persistence."""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from ...events import Lookup, Verdict
from ...kv import cache_parameter, find_cache
from ...models import model_spec, prefix_support
from ...registry import register_strategy
from ...request import RequestScope, current_scope, namespace_tag
from ..base import Strategy
from .block import BlockShape, PrefixBlock
from .call import GroupCall, PrefixRun, group_arguments, merge_caches, merge_outputs
from .config import PrefixConfig
from .layout import Group, plan
from .rows import Row, RowLookup
from .siblings import SiblingIndex
from .slots import SlotStorage

_RUN = "prefix.run"


@register_strategy("prefix")
class PrefixStrategy(RowLookup, GroupCall, Strategy):
    """Lossless: the longest cached prefix of each row is reused, only the suffix is computed."""

    intermediate_states_exact = False  # hidden states of reused positions in inner layers are not recomputed

    config_class = PrefixConfig
    lossless = True
    shares_entries = True

    def attach(self) -> None:
        model = self.context.model
        self.owner = self._check_model(model)
        self.block_size = self.config.block_size
        spec = model_spec(self.owner)
        self.shape = BlockShape(len(self.layers), spec.kv_heads, spec.head_dim, spec.hidden_size, self.block_size)
        name = self.layers[0].stack
        shape = self.shape
        self.bank = self.new_bank(
            name,
            self.layers[-1].device,
            1,
            PrefixBlock,
            expected={"shape": shape},
            storage=lambda device, dtype, entries, nbytes: SlotStorage(shape, device, dtype, entries, nbytes),
            digests_required=True,
        )
        self.siblings = SiblingIndex()
        self._draws = random.Random(0)  # which calls verify_fraction audits; seeded, so runs repeat
        self._warned_disagreement = False
        if self.owner is not model:
            self.hooks.forward_hook(self.owner, self._splice_hook)

    def _check_model(self, model: torch.nn.Module) -> PreTrainedModel:
        """The base model owning the layer stack; ``ValueError`` for anything prefix reuse cannot serve exactly (the
        capabilities it needs are model knowledge: :func:`hf_layercache.models.prefix_support`)."""
        stacks = {layer.stack for layer in self.layers}
        modules = dict(model.named_modules())
        stack = next(iter(stacks))
        owner = modules.get(stack.rpartition(".")[0], model) if len(stacks) == 1 else model
        try:
            self.support = prefix_support(model, owner)
        except ValueError as error:
            raise ValueError(
                f"strategy='prefix' cannot reuse prompt prefixes of {type(model).__name__} exactly: {error} "
                "Use strategy='exact' to reuse whole repeated requests instead."
            ) from None
        if len(stacks) != 1 or len(self.layers) != len(modules[stack]):
            raise ValueError(
                f"strategy='prefix' reuses the key/value states of every layer of one stack, but the selected layers "
                f"are {[layer.name for layer in self.layers]}; leave layers=None."
            )
        if self.support.max_length is not None and self.support.max_length < self.config.block_size:
            raise ValueError(
                f"strategy='prefix' cannot reuse prompt prefixes of {type(model).__name__}: "
                f"{self.support.reason}, and calls of up to {self.support.max_length} tokens hold less than one "
                f"block (block_size {self.config.block_size}). Use a smaller block_size, or strategy='exact'."
            )
        return owner

    # --- one request ----------------------------------------------------------------------------------------------
    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        rows = self._rows(scope, arguments)
        width = arguments["input_ids"].shape[1] if rows is not None else 0
        if rows is None or (self.support.max_length is not None and width > self.support.max_length):
            for layer in self.layers:
                self.context.counters.record_bypass(layer.name, _token_count(arguments))
            return original(**arguments)
        if any(row.entries for row in rows) and self._draws.random() < self.verify_fraction:
            return self._audit(original, arguments, rows)
        groups = plan(rows, width, self.block_size)
        start = time.perf_counter()
        if len(groups) == 1 and groups[0].split == 0 and not any(row.pending for row in rows):
            output = original(**arguments)  # nothing to reuse, nothing to store: the plain call, counted
            self._record(rows, time.perf_counter() - start)
            return output
        namespace = namespace_tag(scope.namespace)
        batch = len(rows)
        calls = (
            [arguments]
            if len(groups) == 1
            else [group_arguments(arguments, torch.tensor(g.rows), batch) for g in groups]
        )
        runs = self._prepare_all(calls, rows, groups)
        if runs is None:  # a block was evicted and its slot reused since the lookup: compute, never serve it
            for row in rows:
                row.reused, row.pending = 0, []
            output = original(**arguments)
        else:
            outputs = [self._run(scope, original, call, run, namespace) for call, run in zip(calls, runs, strict=True)]
            output = outputs[0] if len(runs) == 1 else self._merge(arguments, outputs, runs, groups)
        self._record(rows, time.perf_counter() - start)
        return output

    def _audit(self, original: Callable[..., Any], arguments: dict[str, Any], rows: list[Row]) -> Any:
        """A call drawn by ``verify_fraction``: computed whole, and every block it would have reused compared with
        the final hidden states just computed at its positions. A block that disagrees (stale, or altered since it
        was stored) is dropped with the rest of its row's chain, and reported."""
        start = time.perf_counter()
        captured: list[torch.Tensor] = []
        handle = self.owner.register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
        try:
            output = original(**arguments)
        finally:
            handle.remove()
        fresh = captured[-1]
        tolerance = max(1e-4, 8 * torch.finfo(fresh.dtype).eps)
        with self.bank.lock:
            for r, row in enumerate(rows):
                ids = [*row.found, *([row.tail[0]] if row.tail else [])]
                sizes = [self.block_size] * len(row.found) + ([row.tail[1]] if row.tail else [])
                for index, (entry_id, block) in enumerate(zip(ids, row.entries, strict=True)):
                    if not self.bank.holds(entry_id, "key", block.key):
                        break
                    column = row.first + index * self.block_size
                    computed = fresh[r, column : column + sizes[index]].float()
                    stored = block.hidden[: sizes[index]].to(computed.device).float()
                    agrees = torch.allclose(stored, computed, rtol=tolerance, atol=tolerance)
                    error = ((stored - computed).norm() / computed.norm().clamp_min(1e-12)).item()
                    verdict = Verdict(entry_id, error, agrees, explored=False)
                    self.context.record_verdict(verdict, self.bank, self.layers[-1].name)
                    if not agrees:
                        self._drop_chain(ids[index:], error)
                        break
        for row in rows:
            row.reused, row.pending = 0, []
        self._record(rows, time.perf_counter() - start)
        return output

    def _drop_chain(self, entry_ids: list[int], error: float) -> None:
        for entry_id in entry_ids:
            self.bank.remove(entry_id)
        if not self._warned_disagreement:
            self._warned_disagreement = True
            warnings.warn(
                f"A prefix block disagrees with the model it stands for (relative error {error:.3g}): it was dropped "
                "with the blocks after it, and the computed output served. The weights may have been written without "
                "torch (call model.layer_cache.weights_changed()), or a warm cache altered (see integrity_key in "
                "docs/reliability.md).",
                stacklevel=4,
            )

    def _prepare_all(self, calls: list[dict[str, Any]], rows: list[Row], groups: list[Group]) -> list[PrefixRun] | None:
        """Every group's prefix cache, gathered before any group stores (a store may evict a block another group
        reuses, and hand its slot to a new one); ``None`` when a looked-up block is no longer the bank's."""
        dtype = self.context.model.dtype
        with self.bank.lock:
            for row in rows:
                used = zip(row.used(self.block_size), row.entries, strict=False)
                if not all(self.bank.holds(entry_id, "key", block.key) for entry_id, block in used):
                    return None
            return [self._prepare(call, rows, group, dtype) for call, group in zip(calls, groups, strict=True)]

    def _run(
        self,
        scope: RequestScope,
        original: Callable[..., Any],
        arguments: dict[str, Any],
        run: PrefixRun,
        namespace: int,
    ) -> Any:
        """One group's call (``arguments`` are its rows'), the caller's layout restored, its blocks stored."""
        scope.state[_RUN] = run
        start = time.perf_counter()
        output = original(**self._suffix_arguments(arguments, run, cache_parameter(original)))
        seconds = time.perf_counter() - start
        scope.state.pop(_RUN, None)
        if self.owner is self.context.model:
            output = self._splice(output, run)
        if run.hidden is None:
            raise RuntimeError(f"prefix strategy: {type(self.owner).__name__} was not called; outputs would be short.")
        self._restore(run)
        computed = sum(run.rows[r].length - run.rows[r].reused for r in run.group.rows)
        self._store(run, namespace, seconds / max(computed, 1))
        return output

    def _merge(self, arguments: dict[str, Any], outputs: list[Any], runs: list[PrefixRun], groups: list[Group]) -> Any:
        """The groups' outputs and caches as the batch's, rows in the caller's order."""
        order = torch.argsort(torch.tensor([r for group in groups for r in group.rows]))
        cache = None
        if runs[0].keep_cache:
            cache = merge_caches(runs, order, find_cache(arguments), self.owner.config, self.shape.n_layers)
        return merge_outputs(outputs, runs, order, cache)

    # --- output ---------------------------------------------------------------------------------------------------
    def _splice_hook(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on the base model inside a head model: widen its output before the head reads it."""
        scope = current_scope()
        run = scope.state.get(_RUN) if scope is not None else None
        if run is None or run.hidden is not None:
            return None
        return self._splice(output, run)

    # --- bookkeeping ----------------------------------------------------------------------------------------------
    def _store(self, run: PrefixRun, namespace: int, seconds_per_token: float) -> None:
        """Put every row's pending blocks in the bank, chain tails first, and index them under their parents."""
        if run.cache.get_seq_length() != run.hidden.shape[1]:
            return  # the model did not leave the states we expect: store nothing rather than guess
        layers = run.cache.layers[: self.shape.n_layers]
        stored: set[bytes] = set()
        pending = [(i, run.rows[r], block) for i, r in enumerate(run.group.rows) for block in run.rows[r].pending]
        for r, row, block in reversed(pending):
            if block.digest in stored or self.bank.find(block.digest) is not None:
                continue
            stored.add(block.digest)
            column, tokens = row.first + block.start, row.tokens[block.start : block.start + block.size].clone()
            end = column + block.size
            entry = PrefixBlock(
                key=torch.stack([layer.keys[r, :, column:end].to(self.bank.device) for layer in layers]),
                value=torch.stack([layer.values[r, :, column:end].to(self.bank.device) for layer in layers]),
                hidden=run.hidden[r, column:end],
                tokens=tokens,
                parent=block.parent,
            )
            cost = seconds_per_token * block.size
            entry_id = self.bank.put(entry, digest=block.digest, cost=cost, namespace=namespace)
            if self.context.shared is not None:  # written to the replicas' Redis in the background
                self.context.shared.write(self.bank, entry_id, block.digest, namespace, cost)
            if entry_id is not None:
                self.siblings.add(block.parent, entry_id, tokens)
        self.siblings.sweep_if_large(self.bank.__contains__, len(self.bank))

    def _record(self, rows: list[Row], seconds: float) -> None:
        """The call's lookup, once: the blocks it reused to the policy (tail first, so a chain's shared head is its
        most recent entry), and to every layer's stats the tokens reused and computed (each layer reuses or computes
        the same positions; the call's time is shared out evenly)."""
        served = [(entry_id, 1.0) for row in rows for entry_id in reversed(row.used(self.block_size))]
        lookup = Lookup(served, missed=sum(1 for row in rows if row.pending))
        reused = sum(row.reused for row in rows)
        computed = sum(row.length - row.reused for row in rows)
        for layer in self.layers:
            self.context.counters.record_compute(layer.name, computed, seconds / len(self.layers))
        self.context.record_lookup(lookup, self.bank, [layer.name for layer in self.layers], (reused, computed))

    # --- persistence ----------------------------------------------------------------------------------------------
    def banks_replaced(self) -> None:
        """After a load (or a clear), index the siblings of the bank's entries: a warm cache's children become
        findable, and a cleared bank's hints go."""
        self.siblings.replace([(block.parent, i, block.tokens) for i, block in self.bank.items()])


def _token_count(arguments: dict[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0] * value.shape[1])
    return 0
