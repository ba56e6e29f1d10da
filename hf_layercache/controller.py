"""The object behind ``model.layer_cache``: wires the strategy, its banks, the request scope and the stats."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from .bank import CacheBank
from .config import LayerCacheConfig
from .hooks import ForwardHook, attach_forward_hook, remove_forward_hook
from .layers import ArgumentBinder, select_layers
from .persistence import (
    LayerCacheFileError,
    identity_differences,
    model_identity,
    read_header,
    read_tensors,
    resolve_cache_dir,
    write_cache,
)
from .registry import get_backend, get_policy, get_strategy
from .request import RequestScope, current_scope, open_scope
from .stats import CacheStats, format_report

ATTRIBUTE = "layer_cache"


class RequestHook(ForwardHook):
    """Opens a :class:`RequestScope` around the outermost forward of the model (or of a stack's owner)."""

    def __init__(self, controller: LayerCacheController):
        self.controller = controller
        self.binder: ArgumentBinder | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if current_scope() is not None:
            return self.original(*args, **kwargs)
        if self.binder is None:
            self.binder = ArgumentBinder(self.original)
        arguments = self.binder.bind(args, kwargs)
        scope = RequestScope(self.controller.current_namespace, self.controller.bypass_reason(module, arguments))
        with open_scope(scope):
            if scope.bypass_reason is not None:
                return self.original(*args, **kwargs)
            self.controller.strategy.begin_request(scope, arguments)
            return self.controller.strategy.forward_request(scope, self.original, arguments)


class LayerCacheController:
    """Controls the layer cache of one model: ``stats()``, ``clear()``, ``save()``, ``load()``, ``bypass()``."""

    def __init__(self, model: torch.nn.Module, config: LayerCacheConfig):
        self.model = model
        self.config = config
        self.layers = select_layers(model, config.layers)
        self.stats_ = CacheStats([layer.name for layer in self.layers])
        self._local = threading.local()
        self._identity: dict[str, Any] | None = None
        self.strategy = get_strategy(config.strategy)(self)
        self._scoped: list[torch.nn.Module] = []

    # --- wiring ---------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        self.strategy.attach()
        for module in self._request_modules():
            attach_forward_hook(module, RequestHook(self))
            self._scoped.append(module)
        self.model.__dict__[ATTRIBUTE] = self

    def detach(self) -> None:
        for module in self._scoped:
            remove_forward_hook(module)
        self._scoped.clear()
        self.strategy.detach()
        self.model.__dict__.pop(ATTRIBUTE, None)

    def _request_modules(self) -> list[torch.nn.Module]:
        """The model and every pre-trained submodule owning a stack (``generate`` calls T5's encoder directly)."""
        modules = dict(self.model.named_modules())
        found = [self.model]
        for layer in self.layers:
            parts = layer.stack.split(".")
            for depth in range(len(parts) - 1, 0, -1):
                owner = modules.get(".".join(parts[:depth]))
                if isinstance(owner, PreTrainedModel):
                    if all(owner is not m for m in found):
                        found.append(owner)
                    break
        return found

    def build_bank(self, name: str, device: torch.device, n_banks: int, key_dim: int | None = None) -> CacheBank:
        """A bank with the config's policy, backend and its even share of ``max_memory``."""
        config = self.config
        budget = config.max_memory_bytes
        bank_device = torch.device("cpu") if config.bank_device == "cpu" else device
        backend = None
        if key_dim is not None:
            backend = get_backend(config.backend)(key_dim, metric="cosine", device=bank_device, **config.backend_kwargs)
        return CacheBank(
            name,
            policy=get_policy(config.policy)(**config.policy_kwargs),
            backend=backend,
            max_entries=config.max_entries,
            max_bytes=budget // n_banks if budget is not None else None,
            device=bank_device,
            storage_dtype=getattr(torch, config.storage_dtype) if config.storage_dtype else None,
        )

    # --- request state --------------------------------------------------------------------------------------------
    @property
    def current_namespace(self) -> str:
        return getattr(self._local, "namespace", None) or self.config.namespace

    def bypass_reason(self, module: torch.nn.Module, arguments: dict[str, Any]) -> str | None:
        """Why a request must run uncached, or ``None``."""
        config = getattr(module, "config", None)
        if getattr(self._local, "bypass", 0):
            return "bypass()"
        if module.training:
            return "training mode"
        wants_maps = arguments.get("output_attentions", getattr(config, "output_attentions", False))
        if wants_maps and not self.strategy.serves_attention_maps:
            return "output_attentions"
        wants_states = arguments.get("output_hidden_states", getattr(config, "output_hidden_states", False))
        if wants_states and not self.strategy.intermediate_states_exact:
            return "output_hidden_states"
        return None

    @contextlib.contextmanager
    def bypass(self) -> Iterator[None]:
        """Run the enclosed calls (in this thread) uncached, e.g. to measure or to verify."""
        self._local.bypass = getattr(self._local, "bypass", 0) + 1
        try:
            yield
        finally:
            self._local.bypass -= 1

    @contextlib.contextmanager
    def namespace(self, name: str) -> Iterator[None]:
        """Serve and store the enclosed calls (in this thread) in namespace ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"namespace must be a non-empty string, got {name!r}.")
        previous = getattr(self._local, "namespace", None)
        self._local.namespace = name
        try:
            yield
        finally:
            self._local.namespace = previous

    # --- reporting and housekeeping -------------------------------------------------------------------------------
    @property
    def banks(self) -> dict[str, CacheBank]:
        return self.strategy.banks

    def stats(self) -> dict[str, Any]:
        """Per-layer lookups, hits, misses, bypassed rows and estimated seconds saved; per-bank entries and bytes."""
        return self.stats_.report({name: (len(bank), bank.nbytes) for name, bank in self.banks.items()})

    def format_stats(self) -> str:
        return format_report(self.stats())

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        for bank in self.banks.values():
            bank.clear()
        self.strategy.banks_replaced()
        self.stats_.reset()

    # --- persistence ----------------------------------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = model_identity(self.model, len(self.layers))
        return self._identity

    def save(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write ``layer_cache_config.json`` and the safetensors shard(s) of every bank into ``directory``."""
        tensors = {f"{name}/{key}": t for name, bank in self.banks.items() for key, t in bank.state_dict().items()}
        header = {
            "config": self.config.to_dict(),
            "model": self.identity,
            "banks": {name: {"entries": len(bank), "bytes": bank.nbytes} for name, bank in self.banks.items()},
        }
        write_cache(directory, header, tensors, max_shard_size)

    def load(self, directory: str | os.PathLike) -> None:
        """Replace every bank's content with the warm cache in ``directory``, after checking it fits this model."""
        directory = resolve_cache_dir(directory)
        header = read_header(directory)
        differences = identity_differences(header["model"], self.identity)
        if differences:
            raise LayerCacheFileError(
                f"The layer cache in {directory} was saved for another model ({header['model'].get('class')}): "
                + "; ".join(differences)
                + ". Clear it or fill a new one for this model."
            )
        saved_strategy = header["config"].get("strategy")
        if saved_strategy != self.config.strategy:
            raise LayerCacheFileError(
                f"The layer cache in {directory} holds strategy {saved_strategy!r} entries; this model uses "
                f"{self.config.strategy!r}."
            )
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in read_tensors(directory).items():
            bank, sep, key = name.partition("/")
            if not sep or bank not in self.banks:
                raise LayerCacheFileError(
                    f"The layer cache in {directory} has tensor {name!r} for an unknown bank; this model's banks "
                    f"are {sorted(self.banks)}."
                )
            grouped.setdefault(bank, {})[key] = tensor
        for stage in ("check", "load"):  # every bank is checked before any is replaced
            for bank_name, state in grouped.items():
                try:
                    if stage == "check":
                        self.strategy.check_state(bank_name, state)
                    else:
                        self.banks[bank_name].load_state_dict(state)
                except (KeyError, ValueError, RuntimeError, IndexError) as err:
                    raise LayerCacheFileError(f"The layer cache in {directory}, bank {bank_name!r}: {err}") from None
        self.strategy.banks_replaced()
