"""``PrefixStrategy``: the model gate, the suffix call, gathering and splicing the prefix, storing, persistence."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.utils import ModelOutput

from ...bank import BankState, Lookup
from ...kv import cache_parameter, find_cache, without_cache
from ...models import model_spec, prefix_heads
from ...registry import register_strategy
from ...request import RequestScope, current_scope, namespace_tag
from ..base import Strategy
from .block import BlockShape, PrefixBlock
from .rows import PrefixRun, Row, RowLookup
from .siblings import SiblingIndex

if TYPE_CHECKING:
    from ...config import LayerCacheConfig

_RUN = "prefix.run"


@register_strategy("prefix")
class PrefixStrategy(RowLookup, Strategy):
    """Lossless: the longest cached prefix of each row is reused, only the suffix is computed."""

    intermediate_states_exact = False  # hidden states of reused positions in inner layers are not recomputed

    config_fields = ("block_size", "shared_store", "shared_store_kwargs")  # the shared ones: docs/shared.md

    @classmethod
    def check_config(cls, config: LayerCacheConfig) -> None:
        """Refuse bad values of the config fields this strategy declares (whichever strategy is selected)."""
        if isinstance(config.block_size, bool) or not isinstance(config.block_size, int) or config.block_size < 1:
            raise ValueError(f"block_size must be a positive int (tokens per prefix block), got {config.block_size!r}.")

    def attach(self) -> None:
        model = self.controller.model
        self.owner = self._check_model(model)
        self.block_size = self.config.block_size
        spec = model_spec(self.owner)
        self.shape = BlockShape(len(self.layers), spec.kv_heads, spec.head_dim, spec.hidden_size, self.block_size)
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
        supported = prefix_heads()
        if getattr(config, "is_encoder_decoder", False) or model_type not in supported:
            raise ValueError(
                f"strategy='prefix' reuses prompt prefixes of causal decoders ({', '.join(supported)}); "
                f"{name} (model_type {model_type!r}) is not one of them. {alternative}"
            )
        if name not in supported[model_type]:
            raise ValueError(
                f"strategy='prefix' supports {', '.join(supported[model_type])} for model_type "
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
            for layer in self.layers:
                self.controller.stats_.record_bypass(layer.name, _token_count(arguments))
            return original(**arguments)
        split = self._split(rows, arguments["input_ids"].shape[1])
        if split == 0 and not any(row.pending for row in rows):
            start = time.perf_counter()  # nothing to reuse, nothing to store: the plain call, counted
            output = original(**arguments)
            self._record(rows, time.perf_counter() - start)
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
        self._store(run, namespace_tag(scope.namespace), seconds / max(computed, 1))
        self._record(rows, seconds)
        return output

    def _split(self, rows: list[Row], length: int) -> int:
        """The first computed column: every row must have cached all its real tokens before it. A row that may not
        reuse (its positions do not fit) is computed whole, pad columns included, as uncached computes them."""
        limits = [
            row.first + row.cached(self.block_size) if row.tokens is not None else 0 for row in rows if row.length
        ]
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
        shape = self.shape
        keys = torch.empty((shape.n_layers, len(rows), shape.kv_heads, split, shape.head_dim), **options)
        values = torch.empty_like(keys)
        hidden = torch.empty((len(rows), split, shape.hidden_size), **options)
        for r, row in enumerate(rows):
            pads = split - row.reused  # a row's reused tokens end at the split column
            keys[:, r, :, :pads], values[:, r, :, :pads], hidden[r, :pads] = 0, 0, 0
            for b in range(math.ceil(row.reused / self.block_size)):
                entry = row.entries[b]
                start = pads + b * self.block_size
                width = min(self.block_size, split - start)
                keys[:, r, :, start : start + width] = entry.key[:, :, :width]
                values[:, r, :, start : start + width] = entry.value[:, :, :width]
                hidden[r, start : start + width] = entry.hidden[:width]
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
    def _store(self, run: PrefixRun, namespace: int, seconds_per_token: float) -> None:
        """Put every row's pending blocks in the bank, chain tails first, and index them under their parents."""
        if run.cache.get_seq_length() != run.hidden.shape[1]:
            return  # the model did not leave the states we expect: store nothing rather than guess
        layers = run.cache.layers[: self.shape.n_layers]
        stored: set[bytes] = set()
        pending = [(r, row, block) for r, row in enumerate(run.rows) for block in row.pending]
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
            entry_id = self.bank.put(entry.to_tensors(), digest=block.digest, cost=cost, namespace=namespace)
            if self.controller.shared is not None:  # written to the replicas' Redis in the background
                self.controller.shared.write(self.bank, entry_id, block.digest, namespace, cost)
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
            self.controller.stats_.record_compute(layer.name, computed, seconds / len(self.layers))
        self.controller.record_lookup(lookup, self.bank, [layer.name for layer in self.layers], (reused, computed))

    # --- persistence ----------------------------------------------------------------------------------------------
    def check_entry(self, bank_name: str, values: dict[str, torch.Tensor]) -> None:
        PrefixBlock.validate(values, self.shape)

    def check_state(self, bank_name: str, state: dict[str, torch.Tensor]) -> BankState:
        parsed = super().check_state(bank_name, state)
        if any(digest is None for digest in parsed.digests.values()):
            raise ValueError("every prefix entry needs its chain digest.")
        return parsed

    def banks_replaced(self) -> None:
        """After a load (or a clear), index the siblings of the bank's entries: a warm cache's children become
        findable, and a cleared bank's hints go."""
        blocks = [(i, PrefixBlock.from_tensors(values)) for i, values in self.bank.items()]
        self.siblings.replace([(block.parent, i, block.tokens) for i, block in blocks])


def _token_count(arguments: dict[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0] * value.shape[1])
    return 0
