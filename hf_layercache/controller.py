"""The object behind ``model.layer_cache``: wires the strategy, its banks, the request scope and the stats."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel

from .bank import CacheBank
from .config import LayerCacheConfig
from .events import Lookup, Verdict
from .foreign_hooks import ForeignHooks
from .hooks import ForwardHook, HookRegistry, compiled
from .identity import ModelIdentity, forward_config, numerics_state
from .inflight import InFlightRequests
from .integrity import ENV_VAR, resolve_key
from .layers import ArgumentBinder, select_layers
from .models import model_spec
from .persistence import (
    LayerCacheFileError,
    LayerCacheMismatchError,
    WarmCache,
    check_signature,
    check_timing,
    open_cache,
    write_cache,
)
from .registry import get_backend, get_policy, get_strategy
from .request import RequestScope, check_namespace, current_scope, namespace_tag, open_scope
from .shards import read_tensors
from .stats import CacheStats, format_report
from .storage import Storage
from .watch import ModelWatch

ATTRIBUTE = "layer_cache"

Method = TypeVar("Method", bound=Callable[..., Any])


def _alone(what: str) -> Callable[[Method], Method]:
    """A controller method that reconfigures the cache: it runs once the requests in flight have ended, and the
    requests arriving meanwhile wait for it (``inflight.py``)."""

    def decorate(method: Method) -> Method:
        @functools.wraps(method)
        def alone(self: LayerCacheController, *args: Any, **kwargs: Any) -> Any:
            with self.requests.reconfiguration(what):
                return method(self, *args, **kwargs)

        return alone  # type: ignore[return-value]

    return decorate


class RequestHook(ForwardHook):
    """Opens a :class:`RequestScope` around the outermost forward of the model (or of a stack's owner)."""

    def __init__(self, controller: LayerCacheController):
        self.controller = controller
        self.binder: ArgumentBinder | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if current_scope() is not None:
            return self.original(*args, **kwargs)
        if compiled() and not self.controller.strategy.compiles:
            name = self.controller.config.strategy
            raise RuntimeError(
                f"The layer cache (strategy={name!r}) on {type(module).__name__} does not work under torch.compile: "
                "its cache runs inside the layers' compiled code. Run this model uncompiled, or compile it without "
                "the cache (hf_layercache.disable(model)); 'exact', 'prefix' and 'semantic' support torch.compile."
            )
        with self.controller.requests.request():
            if not self.controller.attached:  # disabled while this call waited for the gate
                return self.original(*args, **kwargs)
            return self._serve(module, args, kwargs)

    def _serve(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self.binder is None:
            self.binder = ArgumentBinder(self.original)
        arguments = self.binder.bind(args, kwargs)
        scope = self.controller.new_scope(module, arguments)
        with open_scope(scope):
            if scope.bypass_reason is not None:
                return self.original(*args, **kwargs)
            self.controller.strategy.begin_request(scope, arguments)
            return self.controller.strategy.forward_request(scope, self.original, arguments)


class LayerCacheController:
    """Controls the layer cache of one model: ``stats()``, ``clear()``, ``save()``, ``load()``, ``bypass()``.

    It is also the strategy's :class:`~hf_layercache.strategies.base.StrategyContext`: the strategy is built as
    ``cls(controller)`` and uses only what that protocol names.
    """

    def __init__(self, model: torch.nn.Module, config: LayerCacheConfig):
        self.model = model
        self.config = config
        self.layers = select_layers(model, config.layers)
        self.spec = model_spec(model)
        self.counters = CacheStats([layer.name for layer in self.layers], config.namespace)
        """Per-layer and per-tenant counters, behind ``stats()``."""
        self._local = threading.local()
        self._identity: ModelIdentity | None = None
        self.hooks = HookRegistry()
        """Every attachment to the model; ``detach`` removes them all."""
        self.owners = self._stack_owners()
        self.watch = ModelWatch(model, self.owners)
        """Notices every change of the model's function between requests, and reads the active adapters."""
        self.foreign_hooks = ForeignHooks(model)
        """Other code's forward hooks on the model's modules, while which requests compute (``foreign_hooks.py``)."""
        self._warned_autograd = False
        self._warned_training = False
        self.requests = InFlightRequests()
        """Requests in flight; ``disable``, ``clear``, ``save``, ``load`` and copies wait for them (``inflight.py``)."""
        self.attached = False
        self.shared = None
        """The shared tier (:class:`~hf_layercache.shared_store.tier.SharedTier`) when ``shared_store`` is set: its
        ``flush()`` waits for the background writes, ``close()`` ends them."""
        if config.shared_store is not None:
            from .shared_store.tier import SharedTier  # imports the redis client, only when asked for

            self.shared = SharedTier(config, self.shared_key_space, lambda: self.model.dtype)
        self.strategy = get_strategy(config.strategy)(self)

    # --- wiring ---------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        try:
            self.strategy.attach()
            self.hooks.call("ModelWatch (.data writes, registrations)", self.watch.attach, self.watch.detach)
            self.watch.mark()  # the model as the strategy left it (the attention strategy selects its function)
            for module in [self.model, *(m for m in self.owners if m is not self.model)]:
                self.hooks.replace_forward(module, RequestHook(self))
        except BaseException:
            self.detach()
            raise
        self.hooks.set_attribute(self.model, ATTRIBUTE, self)
        # copy.deepcopy and torch.save look these up on the instance first: the model copies with its own cache, and
        # torch.save(model) says what to do instead of failing on a hooked layer's forward.
        self.hooks.set_attribute(self.model, "__deepcopy__", self.copy_model)
        self.hooks.set_attribute(self.model, "__reduce_ex__", self._refuse_pickle)
        self.attached = True

    @_alone("disable()")
    def detach(self) -> None:
        self.attached = False
        self.hooks.remove_all()
        self.strategy.detach()

    def _stack_owners(self) -> list[torch.nn.Module]:
        """For each layer stack, the innermost pre-trained model holding it (the model itself for a base model): the
        module whose forward is a request (``generate`` calls T5's encoder directly) and whose weights the entries
        depend on (a head computes after the cached states, so its weights do not)."""
        modules = dict(self.model.named_modules())
        found: list[torch.nn.Module] = []
        for layer in self.layers:
            parts = layer.stack.split(".")
            owner = next(
                (
                    modules[path]
                    for path in (".".join(parts[:depth]) for depth in range(len(parts) - 1, 0, -1))
                    if isinstance(modules.get(path), PreTrainedModel)
                ),
                self.model,
            )
            if all(owner is not m for m in found):
                found.append(owner)
        return found

    @contextlib.contextmanager
    def _detached(self) -> Iterator[None]:
        """The model as it is without the cache, then attached again with the same (warm) banks."""
        self.detach()
        try:
            yield
        finally:
            self.attach()
            self.strategy.banks_replaced()

    @_alone("copy.deepcopy(model)")
    def copy_model(self, memo: dict[int, Any] | None = None) -> torch.nn.Module:
        """``copy.deepcopy(model)``: an independent model with its own cache, warm with copies of every entry."""
        states = {name: {k: v.clone() for k, v in bank.state_dict().items()} for name, bank in self.banks.items()}
        with self._detached():
            clone = copy.deepcopy(self.model, memo)
        twin = LayerCacheController(clone, copy.deepcopy(self.config))
        twin.attach()
        twin.replace_banks(states, "the copied cache")
        return clone

    def _refuse_pickle(self, protocol: int) -> None:
        raise TypeError(
            f"{type(self.model).__name__} has a layer cache (model.layer_cache), which cannot be pickled, so "
            "torch.save(model) fails. Save with model.save_pretrained(directory) (weights and warm cache), or call "
            "hf_layercache.disable(model) before torch.save."
        )

    def build_bank(
        self,
        name: str,
        device: torch.device,
        n_banks: int,
        entry_type: type,
        expected: Mapping[str, Any] | None = None,
        key_dim: int | None = None,
        storage: Callable[..., Storage] | None = None,
        digests_required: bool = False,
    ) -> CacheBank:
        """A bank of ``entry_type`` with the config's policy, its even share of ``max_memory``, a backend when
        ``key_dim`` is given, and the storage ``storage(device, dtype, max_entries, max_bytes)`` builds."""
        config = self.config
        budget = config.max_memory_bytes
        max_bytes = budget // n_banks if budget is not None else None
        bank_device = torch.device("cpu") if config.bank_device == "cpu" else device
        dtype = getattr(torch, config.storage_dtype) if config.storage_dtype else None
        backend = None
        if key_dim is not None:
            backend = get_backend(config.backend)(key_dim, metric="cosine", device=bank_device, **config.backend_kwargs)
        build = storage or (lambda device, dtype, _entries, _bytes: Storage(device, dtype))
        return CacheBank(
            name,
            policy=get_policy(config.policy)(**config.policy_kwargs),
            backend=backend,
            max_entries=config.max_entries,
            max_bytes=max_bytes,
            entry_type=entry_type,
            expected=expected,
            storage=build(bank_device, dtype, config.max_entries, max_bytes),
            digests_required=digests_required,
            namespace_quota=config.namespace_quota,
        )

    # --- request state --------------------------------------------------------------------------------------------
    @property
    def current_namespace(self) -> str:
        return getattr(self._local, "namespace", None) or self.config.namespace

    def new_scope(self, module: torch.nn.Module, arguments: dict[str, Any]) -> RequestScope:
        """The scope of a request to ``module``: why it bypasses the cache, or the key space it uses (its tenant's,
        the active adapter set's and the numerics': autocast, float32 precision). Entries made for a function the
        model no longer computes are dropped first."""
        tenant = self.current_namespace
        self.counters.remember_tenant(tenant)
        reason = self._bypassed(module, arguments)
        if reason is None:
            self.drop_stale_entries()  # before the config is read: the watch remembers what it says until it moves
            reason = self._asks_for_states(module, arguments) or self._training_inside(module)
        if reason is not None:
            return RequestScope(tenant, bypass_reason=reason, tenant=tenant)
        adapters = self.watch.adapter_keys()
        if adapters is None:
            return RequestScope(tenant, bypass_reason="a mixed-adapter batch (adapter_names)", tenant=tenant)
        hooked = None if self.strategy.runs_every_module else self.foreign_hooks.reason(self.watch.scans)
        if hooked is not None:
            return RequestScope(tenant, bypass_reason=hooked, tenant=tenant)
        inside, outside = adapters
        numerics = numerics_state()
        if not inside and not numerics:
            return RequestScope(tenant, tenant=tenant, head_key=outside)
        namespace = tenant + (f"\x1f{inside}" if inside else "") + (f"\x1e{numerics}" if numerics else "")
        self.counters.remember_tenant(tenant, key_space=namespace_tag(namespace))
        return RequestScope(namespace, tenant=tenant, head_key=outside)

    def _bypassed(self, module: torch.nn.Module, arguments: dict[str, Any]) -> str | None:
        """Why a request runs uncached whatever the config says, or ``None``."""
        if getattr(self._local, "bypass", 0):
            return "bypass()"
        if module.training:
            return "training mode"
        if torch.is_grad_enabled() and (self.watch.requires_grad() or _inputs_require_grad(arguments)):
            self._warn_autograd()
            return "autograd"
        return None

    def _asks_for_states(self, module: torch.nn.Module, arguments: dict[str, Any]) -> str | None:
        """Which output the strategy cannot serve the request asks for (its own argument, or the config's when it
        passes none or ``None``, which transformers reads the same way), or ``None``."""
        config = getattr(module, "config", None)
        for flag, served in (
            ("output_attentions", self.strategy.serves_attention_maps),
            ("output_hidden_states", self.strategy.intermediate_states_exact),
        ):
            value = arguments.get(flag)
            if not served and (value if value is not None else self.watch.config_value(config, flag)):
                return flag
        return None

    def _training_inside(self, module: torch.nn.Module) -> str | None:
        """``"training mode"`` when a module of the model is in training mode although ``module`` is not (Monte Carlo
        dropout; layers an adapter added after ``eval()``): its forward may compute otherwise. Read after the watch
        scanned the modules registered since the last request."""
        path = self.watch.training_module()
        if path is None:
            return None
        if not self._warned_training:
            self._warned_training = True
            named = f"{path!r} ({type(self.model.get_submodule(path)).__name__})"
            warnings.warn(
                f"hf_layercache: {type(module).__name__} is in eval mode but its module {named} is in training mode, "
                "so requests run uncached: that module may compute otherwise in training mode (dropout is random). "
                "Call model.eval() after adding modules or adapters (PEFT's get_peft_model and transformers' "
                "add_adapter leave new layers in training mode). Warned once per model.",
                stacklevel=4,
            )
        return "training mode"

    def _warn_autograd(self) -> None:
        if not self._warned_autograd:
            self._warned_autograd = True
            warnings.warn(
                "hf_layercache: this request runs with autograd on (parameters or inputs require grad), so it runs "
                "uncached: a served entry has no gradient. Wrap inference in torch.inference_mode() (or "
                "torch.no_grad()) to use the cache. Warned once per model.",
                stacklevel=4,
            )

    def drop_stale_entries(self) -> None:
        """Drop every entry when the model's function changed since the entries were computed (``watch.py``)."""
        change = self.watch.changed()
        if change == "heads":
            self.strategy.heads_changed()
        elif change == "model":
            self._invalidate()

    @_alone("weights_changed()")
    def weights_changed(self) -> None:
        """Drop every entry: the model's function changed by a route the cache cannot see (tensor memory written
        without torch, e.g. through numpy or a C extension). Every torch route is noticed by itself (``watch.py``)."""
        self.watch.mark()
        self.watch.forget()
        self._invalidate()

    def _invalidate(self) -> None:
        for bank in self.banks.values():
            bank.clear()
        self.strategy.banks_replaced()
        self._identity = None
        self.counters.record_invalidation()

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
        check_namespace(name)
        previous = getattr(self._local, "namespace", None)
        self._local.namespace = name
        try:
            yield
        finally:
            self._local.namespace = previous

    # --- reporting and housekeeping -------------------------------------------------------------------------------
    def record_lookup(
        self,
        lookup: Lookup,
        bank: CacheBank | None,
        layers: Iterable[str],
        units: tuple[int, int] | None = None,
    ) -> None:
        """Record what a lookup decided, once, for both readers: ``bank``'s policy (``None``: layers a row passed
        after its lookup elsewhere) and the stats of ``layers``, the layers whose rows it served or left to compute,
        and of the request's tenant. ``units`` counts the hits and misses in other units than lookups (prefix:
        tokens)."""
        if bank is not None:
            bank.record(lookup)
        hits, misses = units if units is not None else (len(lookup.served), lookup.missed)
        scope = current_scope()
        tenant = scope.tenant if scope is not None else None
        self.counters.record_lookup(list(layers), hits, misses, tenant, lookup.partial)

    def record_verdict(self, verdict: Verdict, bank: CacheBank | None, layer: str) -> None:
        """Record what verifying an entry found, once, for ``bank``'s policy and ``layer``'s stats."""
        if bank is not None:
            bank.record_verdict(verdict)
        self.counters.record_verdict(layer, verdict)

    def shared_key_space(self) -> str:
        """What the shared tier's keys carry beyond an entry's digest: a hash of the model identity, the cached
        layers, the strategy and its own fields (so two models, layer selections or block sizes never meet)."""
        described = {
            "identity": self.identity.key(),
            "layers": [layer.name for layer in self.layers],
            "strategy": self.config.strategy,
            "fields": dataclasses.asdict(self.strategy.options) if self.strategy.options is not None else {},
        }
        return hashlib.blake2b(json.dumps(described, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()

    @property
    def banks(self) -> dict[str, CacheBank]:
        return self.strategy.banks

    def stats(self) -> dict[str, Any]:
        """Per-layer lookups, hits, misses, bypassed rows and estimated seconds saved; per-bank entries and bytes;
        entries, hits and misses per namespace (tenants this process has not served show as ``#<tag>``, with entries
        only, e.g. from a warm cache);
        ``"shared"``: the shared tier's counters (``shared_hits``, ``shared_errors``, ...; empty without one)."""
        report = self.counters.report({name: (len(bank), bank.nbytes) for name, bank in self.banks.items()})
        tags: dict[int, int] = {}
        for bank in self.banks.values():
            for tag, count in bank.namespace_counts().items():
                tags[tag] = tags.get(tag, 0) + count
        report["namespaces"] = self.counters.tenant_report(tags, namespace_tag)
        report["shared"] = self.shared.report() if self.shared is not None else {}
        report.update(self.strategy.report())
        return report

    def format_stats(self) -> str:
        return format_report(self.stats())

    @_alone("clear()")
    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        for bank in self.banks.values():
            bank.clear()
        self.strategy.banks_replaced()
        self.strategy.reset_counters()
        self.counters.reset()
        if self.shared is not None:
            self.shared.reset_counters()  # Redis's entries are other replicas' too: clear() never deletes them

    # --- persistence ----------------------------------------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        """What the entries belong to (``identity.py``) as of the last check of the model (each request, ``save``,
        ``load``)."""
        if self._identity is None:
            dtype = getattr(self.model, "dtype", None)
            self._identity = ModelIdentity(
                model_class=type(self.model).__name__,
                model_type=getattr(getattr(self.model, "config", None), "model_type", None),
                num_layers=len(self.layers),
                hidden_size=self.spec.hidden_size,
                dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
                weights_hash=self.watch.digest(),
                config=forward_config(getattr(self.model, "config", None)),
                adapters={name: self.watch.adapter_digest(name) for name in self.watch.adapters()},
                storage_dtype=self.config.storage_dtype,
            )
        return self._identity

    @_alone("save()")
    def save(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write ``layer_cache_config.json`` and the safetensors shard(s) of every saved bank into ``directory``."""
        self.drop_stale_entries()  # the identity saved must describe the model as it is now
        banks = {name: self.banks[name] for name in self.strategy.saved_banks()}
        tensors = {f"{name}/{key}": t for name, bank in banks.items() for key, t in bank.state_dict().items()}
        header = {
            "config": self.config.to_dict(),
            "model": self.identity.to_dict(),
            "banks": {name: {"entries": len(bank), "bytes": bank.nbytes} for name, bank in banks.items()},
            "timing": self.counters.timing(),
        }
        write_cache(directory, header, tensors, max_shard_size, key=resolve_key(self.config.integrity_key))

    @_alone("load()")
    def load(self, directory: str | os.PathLike | WarmCache) -> None:
        """Replace every bank's content with the warm cache in ``directory`` (or one already opened with
        :func:`~hf_layercache.persistence.open_cache`), after checking it fits this model."""
        self.drop_stale_entries()  # the identity compared must describe the model as it is now
        warm = directory if isinstance(directory, WarmCache) else open_cache(directory)
        directory, header = warm.directory, warm.header
        key = resolve_key(self.config.integrity_key)
        if key is not None:
            check_signature(directory, header, key)
        elif "signature" in header:
            warnings.warn(
                f"The layer cache in {directory} is signed, but no integrity key is set, so its signature was NOT "
                f"checked: its entries are trusted unverified. Set {ENV_VAR} (or integrity_key) to check it.",
                stacklevel=3,
            )
        differences = ModelIdentity.from_dict(header["model"]).differences(self.identity)
        if differences:
            raise LayerCacheMismatchError(
                f"The layer cache in {directory} was saved for another model ({header['model'].get('class')}): "
                + "; ".join(differences)
                + ". Clear it or fill a new one for this model."
            )
        saved_strategy = header["config"].get("strategy")
        if saved_strategy != self.config.strategy:
            raise LayerCacheMismatchError(
                f"The layer cache in {directory} holds strategy {saved_strategy!r} entries; this model uses "
                f"{self.config.strategy!r}."
            )
        grouped = read_tensors(warm).by_bank()
        unknown = sorted(set(grouped) - set(self.banks))
        if unknown:
            raise LayerCacheFileError(
                f"The layer cache in {directory} has tensors for unknown bank {unknown[0]!r}; this model's banks "
                f"are {sorted(self.banks)}."
            )
        timing = check_timing(header.get("timing", {}), directory)
        self.replace_banks(grouped, f"The layer cache in {directory}")
        self.counters.seed_timing(timing)

    @_alone("loading banks")
    def replace_banks(self, states: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> None:
        """Load bank states (from disk, or a copied model's); every bank is checked before any is replaced. Each is
        first cut to its bank's budget, so the entries a bank would evict right away are never read."""
        states = dict(states)
        for stage in ("check", "load"):
            for bank_name, state in states.items():
                try:
                    if stage == "check":
                        states[bank_name] = state = dict(self.banks[bank_name].trim_state(state))
                        self.banks[bank_name].check_state(state)
                    else:
                        self.banks[bank_name].load_state_dict(state)
                except (KeyError, ValueError, RuntimeError, IndexError) as err:
                    raise LayerCacheFileError(f"{source}, bank {bank_name!r}: {err}") from None
        self.strategy.banks_replaced()


def _inputs_require_grad(arguments: dict[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in arguments.values())
