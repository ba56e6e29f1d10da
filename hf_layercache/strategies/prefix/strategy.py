"""``PrefixStrategy``: the model gate, the collaborators it builds, and the request path.

A request (:meth:`PrefixStrategy.forward_request`), top to bottom: the :class:`~.lookup.RowLookup` reads its rows and
what the bank holds of them; :func:`~.layout.plan` groups the rows by where their cached prefix ends; then either the
:class:`~.audit.CallAudit` computes a call drawn by ``verify_fraction`` whole and checks the blocks it would have
reused, or the call runs as it is (nothing to reuse or store), or the :class:`~.call.GroupCall` gathers each group's
prefix, computes its suffix (the base model's output spliced through :class:`~.base_call.BaseModelCall`), restores
the caller's layout, stores the new blocks (:class:`~.store.BlockStore`) and merges the groups' outputs; the lookup
is recorded once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from ...events import Lookup
from ...layers import token_count
from ...models import model_spec, prefix_support
from ...registry import register_strategy
from ...request import RequestScope, namespace_tag
from ..base import Strategy
from . import answers
from .audit import CallAudit
from .base_call import BaseModelCall
from .block import BlockShape, PrefixBlock
from .call import GroupCall, batch_hidden, covers_batch
from .config import PrefixConfig
from .layout import copies, plan
from .lookup import RowLookup
from .run import PrefixRun, Row
from .siblings import SiblingIndex
from .slots import SlotStorage
from .store import BlockStore


@register_strategy("prefix")
class PrefixStrategy(Strategy):
    """Lossless: the longest cached prefix of each row is reused, only the suffix is computed."""

    intermediate_states_exact = False  # hidden states of reused positions in inner layers are not recomputed

    config_class = PrefixConfig
    lossless = True
    shares_entries = True
    compiles = True  # the request hook and the base model's output hook are compile boundaries

    def attach(self) -> None:
        model = self.context.model
        self.base_model = self._check_model(model)
        self.block_size = self.config.block_size
        spec = model_spec(self.base_model)
        shape = BlockShape(len(self.layers), spec.kv_heads, spec.head_dim, spec.hidden_size, self.block_size)
        self.bank = self.new_bank(
            self.layers[0].stack,
            self.layers[-1].device,
            1,
            PrefixBlock,
            expected={"shape": shape},
            storage=lambda device, dtype, entries, nbytes: SlotStorage(shape, device, dtype, entries, nbytes),
            digests_required=True,
        )
        self._check_budget(self.bank.storage)
        self.siblings = SiblingIndex()
        shared = self.context.shared
        self.lookup = RowLookup(self.bank, self.siblings, shape, shared)
        base_call = BaseModelCall(self.base_model, model)
        store = BlockStore(self.bank, self.siblings, shared, shape.n_layers)
        devices = [layer.device for layer in self.layers]
        self.group_call = GroupCall(self.bank, shape, self.base_model, model, devices, base_call, store)
        self.audit = CallAudit(self.bank, self.block_size, base_call, self.context.record_verdict, self.layers[-1].name)
        self._draws = random.Random(0)  # which calls verify_fraction audits; seeded, so runs repeat
        if base_call.hooked:
            self.hooks.forward_hook(self.base_model, base_call.on_output)
        self.base_call, self.store = base_call, store
        if callable(getattr(model, "generate", None)):  # conversation turns: decoded tokens stored as blocks
            self.hooks.set_attribute(model, "generate", answers.recording_generate(model.generate, self._store_answers))

    def _check_model(self, model: torch.nn.Module) -> PreTrainedModel:
        """The base model owning the layer stack; ``ValueError`` for anything prefix reuse cannot serve exactly (the
        capabilities it needs are model knowledge: :func:`hf_layercache.models.prefix_support`)."""
        stacks = {layer.stack for layer in self.layers}
        modules = dict(model.named_modules())
        stack = next(iter(stacks))
        base_model = modules.get(stack.rpartition(".")[0], model) if len(stacks) == 1 else model
        try:
            self.support = prefix_support(model, base_model)
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
        return base_model

    def _check_budget(self, storage: SlotStorage) -> None:
        """``ValueError`` when the bank's share of ``max_memory`` cannot hold one block: every block would be
        refused, and the cache would silently never hit."""
        dtype = storage.dtype or next(self.base_model.parameters()).dtype
        slot, budget = storage.slot_bytes(dtype), storage.max_bytes
        if budget is not None and slot > budget:
            raise ValueError(
                f"strategy='prefix' keeps blocks of block_size={self.block_size} tokens, {slot:,} bytes each for "
                f"{type(self.context.model).__name__} in {dtype}, but max_memory={self.config.max_memory!r} gives "
                f"its bank {budget:,} bytes: no block would ever be kept. Raise max_memory or lower block_size."
            )

    # --- one request ----------------------------------------------------------------------------------------------
    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """Rows, plan, then an audit, the plain call or the groups' calls merged, and the lookup recorded once."""
        rows = self.lookup.rows(scope.namespace, arguments)
        width = arguments["input_ids"].shape[1] if rows is not None else 0
        recorder = answers.current()
        if rows is None or (self.support.max_length is not None and width > self.support.max_length):
            for layer in self.layers:
                self.context.counters.record_bypass(layer.name, token_count(arguments))
            if recorder is not None and recorder.follows(arguments):  # a decode step of generate(): noted
                return recorder.step(
                    arguments, lambda on_output: self.base_call.call(scope, original, arguments, on_output)
                )
            return original(**arguments)
        sources = copies(rows, arguments["input_ids"].detach().cpu(), _mask(arguments))
        groups = plan(rows, width, self.block_size, sources)
        start = time.perf_counter()
        runs = None
        if any(row.entries for row in rows) and self._draws.random() < self.verify_fraction:
            output = self.audit.check(scope, original, arguments, rows)
        elif len(groups) == 1 and groups[0].split == 0 and not any(row.pending for row in rows):
            output = original(**arguments)  # nothing to reuse, nothing to store: the plain call, counted
        else:
            runs = self.group_call.prepare(arguments, rows, groups)
            if runs is None:  # a block was evicted and its slot reused since the lookup: compute, never serve it
                for row in rows:
                    row.compute_whole()
                output = original(**arguments)
            else:
                namespace = namespace_tag(scope.namespace)
                outputs = [self.group_call.run(scope, original, run, namespace) for run in runs]
                whole = covers_batch(groups, len(rows))
                output = outputs[0] if whole else self.group_call.merge(arguments, outputs, runs, sources)
        seconds = time.perf_counter() - start
        if recorder is not None:
            self._record_prefill(recorder, scope, arguments, rows, runs, sources, seconds)
        self._record(rows, seconds)
        return output

    def _record_prefill(
        self,
        recorder: answers.AnswerRecorder,
        scope: RequestScope,
        arguments: dict[str, Any],
        rows: list[Row],
        runs: list[PrefixRun] | None,
        sources: list[int],
        seconds: float,
    ) -> None:
        """A ``generate()`` call's prompt, for its answer's blocks; a prompt audited or run whole records nothing
        (its final hidden states were not kept)."""
        if runs is None:
            recorder.valid = False
            return
        computed = max(sum(row.length - row.reused for row in rows), 1)
        hidden = batch_hidden(runs, sources)
        recorder.record_prefill(rows, arguments, hidden, scope.namespace, self.block_size, seconds / computed)

    def _store_answers(self, recorder: answers.AnswerRecorder, kwargs: dict[str, Any]) -> None:
        """After a ``generate()`` call: its decoded tokens' blocks (not after beam search, whose cache rows are
        reordered beams)."""
        beams, eos = answers.generation_settings(self.context.model, kwargs)
        if beams == 1:
            recorder.store(self.store, self.block_size, eos)

    # --- bookkeeping ----------------------------------------------------------------------------------------------
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


def _mask(arguments: dict[str, Any]) -> torch.Tensor | None:
    mask = arguments.get("attention_mask")
    return mask.detach().cpu() if isinstance(mask, torch.Tensor) else None
