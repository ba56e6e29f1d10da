"""``calibrate``: per-layer similarity thresholds for the ``semantic`` strategy, measured on a calibration set.

A threshold means nothing until one knows what a hit at that similarity costs in output quality, and that differs
by layer and by model. Calibration measures it: every calibration text is run once uncached, capturing each cached
layer's input, output and call arguments. For each layer and each text, its nearest other text in that layer's key
space (the one a hit would serve, if its tokens align) is reused at that layer alone, the rest of the stack is
recomputed from there, and the end-to-end error is ``1 - cosine`` between the mean-pooled final states with and
without the reuse. Each layer's threshold is then the lowest similarity at which ``quantile`` of the pairs at or
above it stay within the error budget; a layer where no such similarity exists gets 1.0 (identical inputs only).

The budget is ``1 - target``: ``target`` is the cosine to the uncached output the cache should keep. Residual reuse
can hit at every layer of one request and the errors add up, so it gives each layer ``(1 - target) / layers``;
state reuse jumps once per request and gives each layer the whole budget.

The calibration texts should look like the traffic: near-duplicates in the traffic need near-duplicates here, or
every threshold comes out strict.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import LayerCacheConfig
from .controller import ATTRIBUTE
from .hooks import HookRegistry
from .kv import without_cache
from .layers import ArgumentBinder, CachedLayer, select_layers
from .registry import get_fingerprint
from .strategies.semantic.alignment import align_tokens, take
from .strategies.semantic.config import DEFAULT_FINGERPRINT

_MIN_PAIRS = 5
"""Pairs a threshold must be supported by; fewer and the layer stays at 1.0."""


@dataclass
class _Trace:
    """One calibration text: its tokens and, per cached layer, the call's arguments, input and output."""

    tokens: list[int]
    arguments: list[dict[str, Any]]
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


def calibrate(
    model: torch.nn.Module,
    texts: Sequence[str],
    target: float = 0.99,
    *,
    tokenizer: Any = None,
    config: LayerCacheConfig | None = None,
    quantile: float = 0.9,
    max_length: int = 256,
    progress: bool = True,
) -> LayerCacheConfig:
    """Pick one similarity threshold per cached layer so that hits keep the output's cosine to the uncached one
    at about ``target`` for ``quantile`` of them; return a ``semantic`` config with those thresholds.

    ``config`` supplies every other field (reuse mode, fingerprint, layers, backend, ...); its threshold is replaced.
    ``tokenizer`` defaults to the one saved with the model (``model.name_or_path``). The model runs uncached (the
    cache, if attached, is bypassed and left untouched). Only single-stack models (encoders, decoders) are
    calibrated; an encoder-decoder's stacks interact through cross-attention, which one pass does not replay.
    """
    if not isinstance(target, int | float) or isinstance(target, bool) or not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a cosine similarity in (0, 1], got {target!r}.")
    if not isinstance(quantile, int | float) or isinstance(quantile, bool) or not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}.")
    if len(texts) < 2 or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("texts must hold at least two non-empty strings.")
    base = dataclasses.replace(config or LayerCacheConfig(strategy="semantic"), strategy="semantic", threshold=1.0)
    layers = select_layers(model, base.layers)
    if len({layer.stack for layer in layers}) != 1:
        raise ValueError("calibrate handles models whose cached layers form one stack; select one with `layers`.")
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(model)
    fingerprint = get_fingerprint(base.fingerprint or DEFAULT_FINGERPRINT)(**base.fingerprint_kwargs)
    traces = _trace(model, layers, tokenizer, texts, max_length, progress)
    budget = (1.0 - target) / (len(layers) if base.reuse == "residual" else 1)
    thresholds = []
    for rank in tqdm(range(len(layers)), desc="calibrating layers", disable=not progress):
        if rank < fingerprint.after_layers:
            thresholds.append(1.0)  # the probe's layers always compute
            continue
        sims, errors = _pairs(traces, layers, rank, fingerprint, base)
        thresholds.append(_threshold(sims, errors, budget, quantile))
    return dataclasses.replace(base, threshold=thresholds)


def _tokenizer_of(model: torch.nn.Module) -> Any:
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ValueError("calibrate needs tokenizer=...: the model does not say where it was loaded from.")
    return AutoTokenizer.from_pretrained(path)


def _trace(
    model: torch.nn.Module,
    layers: list[CachedLayer],
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    progress: bool,
) -> list[_Trace]:
    """Run every text uncached, one at a time (no padding), recording each cached layer's call."""
    controller = model.__dict__.get(ATTRIBUTE)
    binders = [ArgumentBinder(layer.module.forward) for layer in layers]
    current: dict[str, list] = {}

    def recorder(i: int):
        def hook(module, args, kwargs, output):
            arguments = binders[i].bind(args, kwargs)
            hidden = arguments.pop(binders[i].first)
            current["arguments"].append(without_cache(arguments))
            current["inputs"].append(hidden[0].detach().clone())
            out = output[0] if isinstance(output, tuple) else output
            current["outputs"].append(out[0].detach().clone())

        return hook

    recording = HookRegistry()  # attached for the tracing pass only, removed exactly after it
    for i, layer in enumerate(layers):
        recording.forward_hook(layer.module, recorder(i), with_kwargs=True)
    traces = []
    device = next(model.parameters()).device
    try:
        extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        with torch.inference_mode(), controller.bypass() if controller is not None else contextlib.nullcontext():
            for text in tqdm(texts, desc="calibration forward passes", disable=not progress):
                batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).to(device)
                current.update(arguments=[], inputs=[], outputs=[])
                model(**batch, **extra)
                tokens = batch["input_ids"][0].tolist()
                traces.append(_Trace(tokens, current["arguments"], current["inputs"], current["outputs"]))
    finally:
        recording.remove_all()
    return traces


def _pairs(
    traces: list[_Trace], layers: list[CachedLayer], rank: int, fingerprint, config: LayerCacheConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every text, the similarity to its nearest alignable neighbour at layer ``rank`` and the end-to-end
    error of reusing that neighbour's layer there."""
    residual = config.reuse == "residual"
    key_rank = rank if residual else fingerprint.after_layers
    keys = torch.cat([_key(fingerprint, t, key_rank) for t in traces])
    keys = F.normalize(keys.float(), dim=-1)
    similarity = keys @ keys.T
    similarity.fill_diagonal_(-2.0)
    sims, errors = [], []
    for i, trace in enumerate(traces):
        for j in similarity[i].argsort(descending=True).tolist()[:3]:
            index = align_tokens(trace.tokens, traces[j].tokens, config.max_unaligned, config.edits)
            if index is None:
                continue
            other = traces[j]
            value = other.outputs[rank] - other.inputs[rank] if residual else other.outputs[rank]
            replaced = trace.inputs[rank] + take(value, index) if residual else take(value, index)
            exact = fingerprint.confirm(trace.tokens, other.tokens)  # what the strategy serves by, when it has one
            sims.append(float(similarity[i, j]) if exact is None else exact)
            errors.append(_end_to_end_error(trace, layers, rank, replaced))
            break
    return torch.tensor(sims), torch.tensor(errors)


def _key(fingerprint, trace: _Trace, rank: int) -> torch.Tensor:
    ids = torch.tensor([trace.tokens])
    return fingerprint(ids, None, trace.inputs[rank].unsqueeze(0))


@torch.inference_mode()
def _end_to_end_error(trace: _Trace, layers: list[CachedLayer], rank: int, replaced: torch.Tensor) -> float:
    """``1 - cosine`` of the mean-pooled final state when layer ``rank`` outputs ``replaced``."""
    hidden = replaced.unsqueeze(0)
    for later in range(rank + 1, len(layers)):
        arguments = copy.copy(trace.arguments[later])
        out = layers[later].module(hidden, **arguments)
        hidden = out[0] if isinstance(out, tuple) else out
    final = trace.outputs[-1].float().mean(0)
    return float(1.0 - F.cosine_similarity(hidden[0].float().mean(0), final, dim=0))


def _threshold(sims: torch.Tensor, errors: torch.Tensor, budget: float, quantile: float) -> float:
    """The lowest similarity whose pairs at or above it keep ``quantile`` of their errors within ``budget``."""
    order = sims.argsort(descending=True)
    sims, errors = sims[order], errors[order]
    best = 1.0
    for n in range(_MIN_PAIRS, len(sims) + 1):
        if float(torch.quantile(errors[:n], quantile)) <= budget:
            best = float(sims[n - 1])
    return round(min(best, 1.0), 4)
