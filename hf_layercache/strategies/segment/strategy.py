"""``SegmentStrategy``: the model gate, the collaborators it builds, and the request path.

A request (:meth:`SegmentStrategy.forward_request`): a call the strategy cannot split into rows passes through; a
single unpadded row is served directly; otherwise every row is served on its own (blended, or computed whole when
its tokens are not one run ending at the last column) and the rows merged back (:func:`~.rows.merge`). One row
(:meth:`SegmentStrategy._serve_row`): its segments looked up (:func:`~.segments.split`), the tokens to recompute
chosen (:mod:`.select`, after :meth:`~.blend.RowBlend.probe` for ``"deviation"``), the call
(:meth:`~.blend.RowBlend.call`, or the plain forward when nothing is reused), new segments stored, counted once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from ...events import Lookup
from ...kv import cache_parameter, find_cache, without_cache
from ...layers import token_count
from ...models import model_spec, prefix_support
from ...registry import register_strategy
from ...request import RequestScope, namespace_tag
from ..base import Strategy
from ..prefix.base_call import BaseModelCall
from .blend import RowBlend
from .config import SegmentConfig
from .entry import SegmentEntry, SegmentShape
from .plan import RowPlan
from .rows import merge, real_tokens, row_arguments, servable
from .segments import digest_of, split
from .select import by_deviation, first_tokens

ROTARY_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "gemma3_text"})
"""Decoders whose keys carry rotary positions in the half-split convention :mod:`.rope` re-rotates, checked one by
one (others may rotate interleaved, add absolute positions, or bias attention by distance: stored keys could not be
moved)."""

_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take the 4-D mask a blended call needs (flash attention takes none)."""


@register_strategy("segment")
class SegmentStrategy(Strategy):
    """Approximate: passages' states reused at any position, a share of their tokens recomputed (docs/segment.md)."""

    config_class = SegmentConfig
    shares_entries = True
    lossless = False
    intermediate_states_exact = False  # inner layers' states of kept tokens are not recomputed

    def attach(self) -> None:
        model = self.context.model
        self.base_model = self._check_model(model)
        spec = model_spec(self.base_model)
        self.shape = SegmentShape(len(self.layers), spec.kv_heads, spec.head_dim, spec.hidden_size)
        self.separator = self._separator_ids(model)
        self.bank = self.new_bank(
            self.layers[0].stack, self.layers[-1].device, 1, SegmentEntry, expected={"shape": self.shape}
        )
        base_call = BaseModelCall(self.base_model, model)
        modules = [layer.module for layer in self.layers]
        self.blend = RowBlend(self.base_model, self.shape, modules, base_call, self.options.segment_probe_layer)
        self.base_call = base_call
        self.shared = self.context.shared
        if base_call.hooked:
            self.hooks.forward_hook(self.base_model, base_call.on_output)
        if self.options.segment_selection == "deviation":
            self.hooks.forward_hook(self.blend.probe_module, self.blend.on_probe_layer)
        self.reset_counters()

    def _check_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The base model owning the layer stack; ``ValueError`` naming why anything else cannot be served."""
        stacks = {layer.stack for layer in self.layers}
        modules = dict(model.named_modules())
        stack = next(iter(stacks))
        base = modules.get(stack.rpartition(".")[0], model) if len(stacks) == 1 else model
        name, model_type = type(model).__name__, getattr(getattr(model, "config", None), "model_type", None)
        try:
            self.support = prefix_support(model, base)
        except ValueError as error:
            raise ValueError(f"strategy='segment' cannot serve {name}: {error}") from None
        if model_type not in ROTARY_MODEL_TYPES or not hasattr(base, "rotary_emb"):
            raise ValueError(
                f"strategy='segment' moves stored keys to new positions by re-rotating them, which it does for the "
                f"rotary decoders {sorted(ROTARY_MODEL_TYPES)}; {name} has model_type {model_type!r}. Use "
                "strategy='prefix' (positions fixed) or 'exact'."
            )
        if len(stacks) != 1 or len(self.layers) != len(modules[stack]):
            raise ValueError(
                "strategy='segment' reuses the key/value states of every layer of one stack, but the selected layers "
                f"are {[layer.name for layer in self.layers]}; leave layers=None."
            )
        implementation = getattr(base.config, "_attn_implementation", None)
        if implementation not in _ATTENTION:
            raise ValueError(
                f"strategy='segment' needs an attention implementation that takes a 4-D mask {_ATTENTION}; {name} "
                f"uses {implementation!r}. Load it with attn_implementation='sdpa'."
            )
        return base

    def _separator_ids(self, model: torch.nn.Module) -> torch.Tensor:
        """The separator's token ids: as given, or the string tokenized by the tokenizer saved with the model."""
        separator = self.options.segment_separator
        if not isinstance(separator, str):
            return torch.tensor(list(separator), dtype=torch.long)
        from transformers import AutoTokenizer

        source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"strategy='segment' tokenizes segment_separator={separator!r} with the tokenizer saved with the "
                f"model, but none loads from {source!r} ({error}); give its token ids instead."
            ) from None
        return torch.tensor(tokenizer.encode(separator, add_special_tokens=False), dtype=torch.long)

    # --- one request ----------------------------------------------------------------------------------------------
    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """Pass through, one row served directly, or every row served and merged."""
        width = arguments["input_ids"].shape[1] if servable(arguments) else 0
        limit = self.support.max_length
        if not width or (limit is not None and width > limit):
            for layer in self.layers:
                self.context.counters.record_bypass(layer.name, token_count(arguments))
            return original(**arguments)
        batch = arguments["input_ids"].shape[0]
        if batch == 1 and (tokens := real_tokens(arguments, 0)) is not None and len(tokens) == width:
            return self._serve_row(scope, original, arguments, tokens, find_cache(arguments))
        outputs, caches = [], []
        for r in range(batch):
            single = row_arguments(arguments, r)
            tokens = real_tokens(arguments, r)
            if tokens is None:
                output = original(**single)
            else:
                single["input_ids"] = single["input_ids"][:, -len(tokens) :]
                single.pop("attention_mask", None)
                single.pop("position_ids", None)
                output = self._serve_row(scope, original, single, tokens, None)
            outputs.append(output)
            caches.append(find_cache(dict(output.items())) if hasattr(output, "items") else None)
        return merge(outputs, caches, width, find_cache(arguments), self.base_model.config)

    def _serve_row(
        self,
        scope: RequestScope,
        forward: Callable[..., Any],
        arguments: dict[str, Any],
        tokens: torch.Tensor,
        caller_cache: Any,
    ) -> Any:
        """One unpadded row: looked up, blended (or computed plainly), its new segments stored, counted."""
        start = time.perf_counter()
        tag = namespace_tag(scope.namespace)
        plan = self._look_up(tokens, scope.namespace, tag)
        share = float(self.options.segment_recompute)
        reused = plan.reused_mask()
        if not bool(reused.any()) or share >= 1.0:  # at 1.0 a full prefill, by definition
            output, cache, hidden = self._plain(scope, forward, arguments)
            plan.recompute = reused.clone()
        else:
            output, cache, hidden = self._blended(scope, forward, arguments, plan, share)
        self._store(plan, cache, hidden, tag, time.perf_counter() - start)
        self._record(plan, time.perf_counter() - start)
        use_cache = arguments.get("use_cache")
        keep = bool(use_cache if use_cache is not None else getattr(self.base_model.config, "use_cache", True))
        return _hand_over(output, cache, caller_cache, keep)

    def _look_up(self, tokens: torch.Tensor, namespace: str, tag: int) -> RowPlan:
        plan = RowPlan(tokens, split(tokens, self.separator, namespace))
        if self.shared is not None:
            self._fetch_shared(plan, namespace, tag)
        for i, segment in enumerate(plan.segments):
            entry_id = self.bank.find(segment.digest)
            entry = self.bank.get(entry_id, tag) if entry_id is not None else None
            if entry is not None and entry.fits(self.shape, tokens[segment.start : segment.end]):
                segment.entry_id = entry_id
                plan.entries[i] = entry
        return plan

    def _fetch_shared(self, plan: RowPlan, namespace: str, tag: int) -> None:
        """The row's segments the bank lacks, from the shared tier in one round trip; a value whose tokens do not
        hash to the key it was found under is a miss (and deleted there)."""

        def check(digest: bytes, values: dict[str, torch.Tensor]) -> None:
            if digest_of(values["tokens"], namespace) != digest:
                raise ValueError("its tokens do not hash to the key it was stored under")

        self.shared.fill(self.bank, [segment.digest for segment in plan.segments], tag, check)

    def _plain(
        self, scope: RequestScope, forward: Callable[..., Any], arguments: dict[str, Any]
    ) -> tuple[Any, DynamicCache, torch.Tensor]:
        """The row computed as it is, into a cache of the strategy's own (to store from)."""
        call = without_cache(arguments)
        cache = DynamicCache(config=self.base_model.config)
        call[cache_parameter(forward)] = cache
        call["use_cache"] = True
        captured: list[torch.Tensor] = []
        output = self.base_call.call(scope, forward, call, lambda out: captured.append(out[0]))
        return output, cache, captured[0]

    def _blended(
        self, scope: RequestScope, forward: Callable[..., Any], arguments: dict[str, Any], plan: RowPlan, share: float
    ) -> tuple[Any, DynamicCache, torch.Tensor]:
        ids = arguments["input_ids"]
        dtype = next(self.base_model.parameters()).dtype
        states = self.blend.gather(plan, dtype, ids.device)
        fresh = None
        if self.options.segment_selection == "deviation":
            fresh = self.blend.probe(scope, ids)
            plan.recompute = by_deviation(plan, share, self.blend.deviation(states, fresh))
        else:
            plan.recompute = first_tokens(plan, share)
        return self.blend.call(scope, forward, arguments, plan, states, fresh)

    def _store(self, plan: RowPlan, cache: DynamicCache, hidden: torch.Tensor, tag: int, seconds: float) -> None:
        """The row's segments the bank lacked, with the states this call gave them (each once)."""
        if cache.get_seq_length() != plan.length:
            return  # the model did not leave the states expected: store nothing rather than guess
        layers = cache.layers[: self.shape.n_layers]
        per_token = seconds / max(plan.length, 1)
        stored: set[bytes] = set()
        for i, segment in enumerate(plan.segments):
            if i in plan.entries or segment.digest in stored or self.bank.find(segment.digest) is not None:
                continue
            stored.add(segment.digest)
            where = slice(segment.start, segment.end)
            entry = SegmentEntry(
                key=torch.stack([layer.keys[0, :, where].to(self.bank.device) for layer in layers]),
                value=torch.stack([layer.values[0, :, where].to(self.bank.device) for layer in layers]),
                hidden=hidden[0, where].detach().to(self.bank.device),
                tokens=plan.tokens[where].clone(),
                start=torch.tensor(segment.start, dtype=torch.long),
            )
            cost = per_token * segment.length
            entry_id = self.bank.put(entry, digest=segment.digest, cost=cost, namespace=tag)
            if self.shared is not None:
                self.shared.write(self.bank, entry_id, segment.digest, tag, cost)

    # --- bookkeeping ----------------------------------------------------------------------------------------------
    def _record(self, plan: RowPlan, seconds: float) -> None:
        """The row's lookup, once: segments served to the policy, and tokens reused (kept) against recomputed and
        computed to every layer's stats."""
        kept = int(plan.kept().sum())
        recomputed = int((plan.reused_mask() & ~plan.kept()).sum())
        computed = plan.length - kept - recomputed
        self.tokens["reused"] += kept
        self.tokens["recomputed"] += recomputed
        self.tokens["computed"] += computed
        served = [(plan.segments[i].entry_id, 1.0) for i in plan.entries]
        lookup = Lookup(served, missed=len(plan.segments) - len(plan.entries))
        for layer in self.layers:
            self.context.counters.record_compute(layer.name, recomputed + computed, seconds / len(self.layers))
        names = [layer.name for layer in self.layers]
        self.context.record_lookup(lookup, self.bank, names, (kept, recomputed + computed))

    def reset_counters(self) -> None:
        self.tokens = {"reused": 0, "recomputed": 0, "computed": 0}

    def report(self) -> dict[str, Any]:
        """``stats()["segment"]``: tokens served from stored segments, recomputed among those, computed anew."""
        return {"segment": {f"tokens_{name}": count for name, count in self.tokens.items()}}


def _hand_over(output: Any, cache: DynamicCache, caller_cache: Any, keep: bool) -> Any:
    """The row's output with its cache as the caller expects it: filled into the cache the caller passed, or left
    out when the caller asked for none (``use_cache=False``)."""
    target = None
    if keep:
        target = caller_cache if caller_cache is not None else cache
        if caller_cache is not None:
            for i, layer in enumerate(cache.layers):
                caller_cache.update(layer.keys, layer.values, i)
    if hasattr(output, "items"):
        values = {k: (target if v is cache else v) for k, v in output.items()}
        return type(output)(**{k: v for k, v in values.items() if v is not None})
    return tuple(target if x is cache else x for x in output if not (x is cache and target is None))
