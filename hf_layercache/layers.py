"""Finding the layer stacks of a model, and what each layer class looks like from the outside.

Everything architecture-specific lives here, as data: which modules are the layers, what a layer returns, which of
its arguments carry the batch in dimension 0. Strategies only see :class:`CachedLayer` and :class:`LayerSpec`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .kv import CACHE_ARGUMENTS

# Layer arguments whose tensors have the batch in dimension 0 (or 1 when they broadcast over the batch).
DEFAULT_BATCH_ARGS = frozenset(
    {
        "hidden_states",
        "attention_mask",
        "position_ids",
        "position_embeddings",
        "position_bias",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "encoder_decoder_position_bias",
    }
)
# Arguments that are the same for every row; they never block splitting a batch by rows.
SHARED_ARGS = frozenset({*CACHE_ARGUMENTS, "cache_position", "use_cache", "output_attentions", "layer_head_mask"})


@dataclass(frozen=True)
class LayerSpec:
    """How a layer class is called and what it returns.

    ``outputs`` is the number of elements of the tuple a layer returns (``0`` for a plain tensor); a cached layer
    must return the same structure without running. The hidden state is always the first element.
    """

    outputs: int = 0
    batch_args: frozenset[str] = DEFAULT_BATCH_ARGS


_LAYER_SPECS: dict[str, LayerSpec] = {
    # T5Block returns (hidden, self-attention position bias, cross-attention position bias); block 0 computes them.
    "T5Block": LayerSpec(outputs=3),
    "MT5Block": LayerSpec(outputs=3),
    "MPNetLayer": LayerSpec(outputs=1),
}


def register_layer_spec(class_name: str, spec: LayerSpec) -> None:
    """Describe a layer class the defaults do not fit (tuple outputs, unusual batch arguments)."""
    _LAYER_SPECS[class_name] = spec


def layer_spec(module: nn.Module) -> LayerSpec:
    return _LAYER_SPECS.get(type(module).__name__, LayerSpec())


@dataclass
class CachedLayer:
    """One layer the cache wraps, with where it sits in the model."""

    name: str
    """Module path, e.g. ``"encoder.layer.3"``."""
    module: nn.Module
    stack: str
    """Module path of the stack (the ``nn.ModuleList``) holding it."""
    index_in_stack: int
    spec: LayerSpec = field(default_factory=LayerSpec)

    @property
    def device(self) -> torch.device:
        """Where the layer computes: accelerate's execution device under a device map, else its parameters'."""
        hook = getattr(self.module, "_hf_hook", None)
        execution_device = getattr(hook, "execution_device", None)
        if execution_device is not None:
            return torch.device(execution_device)
        for param in self.module.parameters():
            if param.device.type != "meta":
                return param.device
        return torch.device("cpu")


def _is_layer_list(module: nn.Module, strict: bool) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    if strict:
        return all(isinstance(child, GradientCheckpointingLayer) for child in module)
    first = type(module[0])
    return all(type(child) is first for child in module) and first.__name__.endswith(("Layer", "Block"))


def find_layer_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The outermost ``nn.ModuleList`` of transformer layers, by module path.

    Layers of transformers 5 subclass ``GradientCheckpointingLayer``; models whose layers do not (MPNet and about
    a hundred others) fall back to lists of identical modules whose class name ends in ``Layer`` or ``Block``.
    """
    for strict in (True, False):
        stacks: dict[str, nn.ModuleList] = {}
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in stacks):
                continue
            if _is_layer_list(module, strict):
                stacks[name] = module
        if stacks:
            return stacks
    return {}


def _layers_of_paths(model: nn.Module, paths: list[str]) -> list[CachedLayer]:
    out = []
    modules = dict(model.named_modules())
    for path in paths:
        module = modules.get(path)
        if module is None:
            raise ValueError(f"layers: {type(model).__name__} has no module {path!r}.")
        if isinstance(module, nn.ModuleList):
            out += [CachedLayer(f"{path}.{i}", m, path, i, layer_spec(m)) for i, m in enumerate(module)]
        else:
            stack, _, index = path.rpartition(".")
            position = int(index) if index.isdigit() else 0
            out.append(CachedLayer(path, module, stack or path, position, layer_spec(module)))
    return out


def select_layers(model: nn.Module, layers: list[int] | list[str] | str | None) -> list[CachedLayer]:
    """The layers a config's ``layers`` field selects, in forward order."""
    if isinstance(layers, str):
        return _layers_of_paths(model, [layers])
    if layers and isinstance(layers[0], str):
        return _layers_of_paths(model, list(layers))
    stacks = find_layer_stacks(model)
    if not stacks:
        raise ValueError(
            f"hf_layercache could not find the layers of {type(model).__name__}. Pass the module path of its layer "
            "list by hand, e.g. LayerCacheConfig(layers='encoder.layer'), or a list of module paths of single layers."
        )
    found = [
        CachedLayer(f"{path}.{i}", m, path, i, layer_spec(m))
        for path, stack in stacks.items()
        for i, m in enumerate(stack)
    ]
    if layers is None:
        return found
    bad = [i for i in layers if i >= len(found)]
    if bad:
        raise ValueError(f"layers={layers!r}: {type(model).__name__} has {len(found)} layers (0..{len(found) - 1}).")
    return [found[i] for i in sorted(layers)]


# --- arguments ------------------------------------------------------------------------------------------------------
class ArgumentBinder:
    """Names every argument of a layer call, so strategies never depend on positional order.

    ``inspect.Signature.bind`` costs tens of microseconds, which matters at one call per layer per request; the
    parameter list is read once here and binding is a dict build.
    """

    def __init__(self, forward):
        params = list(inspect.signature(forward).parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positional = [p.name for p in params if p.kind in positional]
        self.first = params[0].name if params else None

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if len(args) > len(self.positional):
            raise TypeError(f"Layer got {len(args)} positional arguments, expected at most {len(self.positional)}.")
        arguments = dict(zip(self.positional, args, strict=False))
        arguments.update(kwargs)
        return arguments


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a per-row argument, in lists and tuples (what :func:`_map_tensors` cuts to rows)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    return []


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor an argument holds, in lists, tuples and dicts too: what a request's identity must cover."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_tensors(v)]
    if isinstance(value, tuple | list):
        return [t for v in value for t in flat_tensors(v)]
    return []


def token_count(arguments: dict[str, Any]) -> int:
    """Tokens a call runs over (rows times padded length), what a bypassed call is counted in."""
    for name in ("input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0] * value.shape[1])
    return 0


def same_rows(arguments: dict[str, Any], hidden: torch.Tensor, spec: LayerSpec, a: int, b: int) -> bool:
    """Whether rows ``a`` and ``b`` of a layer call have the same input: hidden state and every per-row argument."""
    batch = hidden.shape[0]
    tensors = [hidden, *(t for n, v in arguments.items() if n in spec.batch_args for t in _tensors(v))]
    return all(t.dim() == 0 or t.shape[0] != batch or torch.equal(t[a], t[b]) for t in tensors)


def rows_splittable(arguments: dict[str, Any], spec: LayerSpec, batch: int) -> bool:
    """True when every per-row tensor argument is one we know how to slice by rows."""
    for name, value in arguments.items():
        if name in spec.batch_args or name in SHARED_ARGS:
            continue
        if any(t.dim() > 0 and t.shape[0] == batch and batch > 1 for t in _tensors(value)):
            return False
    return True


def select_rows(arguments: dict[str, Any], spec: LayerSpec, rows: torch.Tensor, batch: int) -> dict[str, Any]:
    """The arguments of a layer call restricted to ``rows`` (tensors that broadcast over the batch are kept)."""

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, rows.to(t.device)) if t.dim() > 0 and t.shape[0] == batch else t

    return {n: _map_tensors(v, pick) if n in spec.batch_args else v for n, v in arguments.items()}
