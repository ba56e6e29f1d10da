"""Noticing, before every request, that the model's function changed under the cache.

Entries are valid only for the computation that made them (:mod:`hf_layercache.identity`). A model changes function
by many routes, and none of them tells the cache, so :class:`ModelWatch` checks what each route leaves behind:

* **in-place writes** (an optimizer step, ``load_state_dict``, ``p.add_``): every in-place op bumps the tensor's
  version counter;
* **writes through ``.data``** (``p.data.copy_(w)``, ``p.data += delta``: how PEFT merges LoRA weights and how EMA
  loops update): ``.data`` returns a tensor with a version counter *of its own*, so nothing on the parameter moves.
  While the cache is attached, each watched tensor's class is swapped for a subclass (same name, no other behaviour)
  whose ``.data`` returns ``detach()``, which shares the counter: such writes bump the version like any other;
* **replaced tensors** (``p.data = t``, ``.to(dtype)``, ``.half()``, a move, ``load_state_dict(assign=True)``,
  accelerate swapping ``_parameters`` entries): another tensor object or data pointer;
* **swapped tensors** (``torch.utils.swap_tensors``, which ``load_state_dict`` and ``.to()`` use under
  ``torch.__future__.set_swap_module_params_on_conversion(True)``): the same object with another tensor behind it,
  whose version may well equal the old one's, so the tensor behind each object is compared too (``_cdata``). The
  watch holds no weak reference to a tensor: ``swap_tensors`` refuses tensors that have one;
* **new or replaced modules, parameters and buffers** (PEFT injecting or merging-and-unloading LoRA layers,
  ``add_adapter``, ``load_adapter``, a user replacing a submodule): torch's global registration hooks report every
  registration, and one on a module of the model makes the watch scan the model again before the next request.
  Modules and tensors that belong to an adapter (a new adapter added beside the others) do not invalidate: adapters
  select key spaces (below);
* **the config**: an attribute of the model's config (or a sub-config) reassigned, e.g. by
  ``set_attn_implementation``.

Comparing ``(id, tensor behind it, version, data pointer)`` of every tensor and a shallow snapshot of the config
reads no tensor data: tens of microseconds per request. What stays invisible is tensor memory written without torch
(through numpy or a C extension): call ``model.layer_cache.weights_changed()`` after such writes, and
``verify_fraction`` lets the lossless strategies catch an entry that disagrees.

The watch also reads the active adapter set per request (:mod:`hf_layercache.adapters`), separately for the adapter
layers inside the stacks' owners (which every entry depends on) and outside them (heads: only whole-model outputs
depend on those), and digests the weights (:meth:`ModelWatch.digest`) for the identity.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterable
from itertools import chain, compress
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from transformers import PreTrainedConfig

from .adapters import AdapterLayers, adapter_prefixes, is_adapter_layer
from .identity import affects_forward, attention_kind, named_tensors, tensor_digest

Change = Literal["model", "heads"]

# --- noticing registrations (process-wide hooks, while any watch is attached) ------------------------------------
_attached: weakref.WeakSet[ModelWatch] = weakref.WeakSet()
_handles: list[Any] = []


def _notice_registration(parent: nn.Module, *_args: Any) -> None:
    for watch in list(_attached):
        watch.notice(parent)


def _start_noticing(watch: ModelWatch) -> None:
    """Install torch's global registration hooks (modules, parameters, buffers) with the first attached watch."""
    if not _attached:
        _handles.extend(
            register(_notice_registration)
            for register in (
                torch_module.register_module_module_registration_hook,
                torch_module.register_module_parameter_registration_hook,
                torch_module.register_module_buffer_registration_hook,
            )
        )
    _attached.add(watch)


def _stop_noticing(watch: ModelWatch) -> None:
    """Remove the global hooks after the last watch detached."""
    _attached.discard(watch)
    if not _attached:
        while _handles:
            _handles.pop().remove()


# --- .data that shares the version counter ---------------------------------------------------------------------
_WATCHED: dict[type, type] = {}
_ORIGINAL: dict[type, type] = {}


def _data_get(self: torch.Tensor) -> torch.Tensor:
    return self.detach()


_TRAINING = operator.itemgetter("training")
_MODE_FREE = frozenset(
    {nn.Identity, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict, nn.Sequential, nn.Flatten}
    | {nn.Linear, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.Conv1d, nn.Conv2d, nn.Conv3d}
    | {nn.RMSNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softmax, nn.LeakyReLU, nn.GLU}
)
"""torch's modules whose computation does not depend on their training flag, by exact class (a subclass, such as a
quantized or wrapped linear layer, may read it); containers' children are read on their own. Every other module
counts, so a new activation put in a model (``mlp.act_fn = nn.ReLU()``, in training mode as built) does not stop the
cache, and a new dropout does."""
_VERSION = operator.attrgetter("_version")
_BEHIND = operator.attrgetter("_cdata")
"""The tensor an object holds (its ``TensorImpl`` address): another after ``swap_tensors``."""
_subclass_functions_off = torch._C.DisableTorchFunctionSubclass
"""While on, reading ``_cdata`` and ``_version`` from a tensor subclass skips the lookup of its
``__torch_function__``."""


def _behind_and_versions(tensors: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """What each tensor object holds and its version, as two plain lists: a tuple per tensor or an array cost a cold
    exact hit 26-40 us more where these cost 8 (docs/benchmarks.md)."""
    with _subclass_functions_off():
        return list(map(_BEHIND, tensors)), list(map(_VERSION, tensors))


_data_assignments = 0
"""``.data = t`` on any watched tensor (the one replacement that keeps the tensor object): the fast check's cue."""


def _data_set(self: torch.Tensor, value: torch.Tensor) -> None:
    global _data_assignments
    _data_assignments += 1
    torch._C.TensorBase.data.__set__(self, value)


def _watched_class(cls: type) -> type:
    """``cls`` with a ``.data`` that shares the tensor's version counter; same name, so checks by name still pass."""
    if cls not in _WATCHED:
        namespace = {"data": property(_data_get, _data_set), "__module__": cls.__module__}
        namespace["__torch_function__"] = torch._C._disabled_torch_function_impl  # ops return plain tensors
        watched = type(cls.__name__, (cls,), namespace)
        _WATCHED[cls], _ORIGINAL[watched] = watched, cls
    return _WATCHED[cls]


def _is_watchable(tensor: torch.Tensor) -> bool:
    cls = type(tensor)
    return cls in _ORIGINAL or cls is torch.Tensor or cls is nn.Parameter


class ModelWatch:
    """Whether ``model``'s function changed since :meth:`mark`, and its active adapter sets (module docstring)."""

    def __init__(self, model: nn.Module, owners: Iterable[nn.Module]):
        self.model = model
        self._owners = list(owners)
        self._attached = False
        self._glance: tuple | None = None
        self._digests: dict[str, str] = {}
        self._adapter_keys: dict[tuple, str] = {}
        self.scans = 0
        """How often the model was scanned: at construction, then after registrations on its modules only."""
        self._scan()
        self.mark()

    # --- attaching ------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Make ``.data`` writes visible on every watched tensor and count registrations; :meth:`detach` undoes."""
        _start_noticing(self)
        self._attached = True
        self._swap_classes()

    def detach(self) -> None:
        """Give every tensor of the model (and those it held at the last :meth:`mark`) its own class back."""
        _stop_noticing(self)
        self._attached = False
        _unwatch(self._slot_tensors(), self)
        if self._glance is not None:
            _unwatch(self._glance[1], self)

    def _swap_classes(self) -> None:
        """Watch every tensor the model holds now: tensors registered, assigned or swapped in since have their own
        classes (the watch keeps no list of what it swapped: the last glance holds the tensors, :meth:`mark`)."""
        for tensor in self._slot_tensors():
            if tensor is not None and type(tensor) not in _ORIGINAL and _is_watchable(tensor):
                tensor.__class__ = _watched_class(type(tensor))

    def _slot_tensors(self) -> list[torch.Tensor | None]:
        return list(chain.from_iterable(self._every_value))

    # --- scanning -------------------------------------------------------------------------------------------------
    def _scan(self) -> None:
        """Find every module's tensor slots (in the stacks' owners or in the heads), the adapter layers and which
        tensors belong to which adapter."""
        self._rescan_due = False
        self.scans += 1
        self._slots: dict[bool, list[dict[str, torch.Tensor | None]]] = {True: [], False: []}
        self._paths: dict[bool, list[str]] = {True: [], False: []}
        structure: list[tuple[str, type]] = []
        adapter_layers: dict[bool, list[nn.Module]] = {True: [], False: []}
        prefixes: dict[str, str] = {}
        in_owners = {id(module) for owner in self._owners for module in owner.modules()}
        self._module_ids = set()
        self._modes: dict[str, dict[str, Any]] = {}
        """Per module whose forward may read its training flag, by path: its ``__dict__``, where the flag lives."""
        self._modes_read: dict[str, nn.Module] = {}
        """Modules that keep the flag elsewhere (a property): read as attributes."""
        for path, module in self.model.named_modules():
            self._module_ids.add(id(module))
            if type(module) not in _MODE_FREE:
                if "training" in module.__dict__:
                    self._modes[path] = module.__dict__
                else:
                    self._modes_read[path] = module
            body = id(module) in in_owners
            if is_adapter_layer(module):
                adapter_layers[body].append(module)
                prefixes.update(adapter_prefixes(path, module))
            if _adapter_of(path, prefixes) is None:
                structure.append((path, type(module)))
            for slot in (module._parameters, module._buffers):
                if slot:
                    self._slots[body].append(slot)
                    self._paths[body].append(path)
        self._structure = tuple(structure)
        self._every_slot = self._slots[True] + self._slots[False]
        self._every_value = [slot.values() for slot in self._every_slot]  # live views: the glance walks these
        self._has_adapter_layers = bool(adapter_layers[True] or adapter_layers[False])
        self._prefixes = prefixes
        self.inside, self.outside = AdapterLayers(adapter_layers[True]), AdapterLayers(adapter_layers[False])
        if self._attached:
            self._swap_classes()

    def notice(self, parent: nn.Module) -> None:
        """A module, parameter or buffer was registered on ``parent``: scan again if it is one of the model's
        (``model.layers[:n]`` builds a new ``ModuleList`` every forward: a module of no model, ignored)."""
        if id(parent) in self._module_ids:
            self._rescan_due = True

    def _tensors(self) -> dict[str, tuple[bool, tuple[int, int, int, int]]]:
        """Each tensor's part (body or head) and ``(id, tensor behind it, version, data pointer)`` by path; an
        adapter's tensors under ``<adapter>|<path>``."""
        found = {}
        for body in (True, False):
            for path, slot in zip(self._paths[body], self._slots[body], strict=True):
                for name, tensor in slot.items():
                    if tensor is not None:
                        full = f"{path}.{name}" if path else name
                        adapter = _adapter_of(full, self._prefixes)
                        found[f"{adapter}|{full}" if adapter else full] = (body, _state(tensor))
        return found

    def _signature(self, body: bool) -> tuple[tuple[int, int, int, int], ...]:
        return tuple(_state(t) for slot in self._slots[body] for t in slot.values() if t is not None)

    # --- the per-request check ------------------------------------------------------------------------------------
    def changed(self) -> Change | None:
        """What changed since the last call or :meth:`mark`: ``"model"`` (every entry is stale), ``"heads"`` (only
        a head's tensors: whole-model outputs are stale, the stacks' entries are not) or ``None``."""
        if not self._rescan_due and self._unchanged_at_a_glance():
            return None
        change = self._rescan() if self._rescan_due else None
        if change is None:
            config = _config_state(self._config)
            if config != self._config_at_mark or self._signature(True) != self._signature_at_mark[True]:
                change = "model"
            elif self._signature(False) != self._signature_at_mark[False]:
                change = "heads"
        if change is not None:
            self.mark()
            self.forget()
        else:
            self._glance = self._glance_now()  # e.g. a bookkeeping field moved: glance from here on
        return change

    def _rescan(self) -> Change | None:
        """Scan again after registrations; adapters added beside the others (or removed) change nothing here: they
        have key spaces of their own."""
        before_structure, before = self._structure, self._tensors_at_mark
        self._scan()
        self.forget()  # an adapter's digest may be new, and so the keys
        now = self._tensors()
        adapters = {key.split("|", 1)[0] for key in now if "|" in key}
        before = {k: v for k, v in before.items() if "|" not in k or k.split("|", 1)[0] in adapters}
        now = {k: v for k, v in now.items() if "|" not in k or k in before}
        if self._structure != before_structure:
            return "model"
        moved = [now.get(k, before.get(k)) for k in before.keys() | now.keys() if now.get(k) != before.get(k)]
        if moved:
            return "model" if any(body for body, _ in moved) else "heads"
        self.mark()
        return None

    def forget(self) -> None:
        """Drop the digests and adapter keys computed so far (the tensors changed)."""
        self._digests.clear()
        self._adapter_keys.clear()

    def mark(self) -> None:
        """Take the model as it is now as the one the entries belong to; tensors it no longer holds get their own
        classes back."""
        if self._rescan_due:
            self._scan()
        elif self._attached:
            self._swap_classes()
        self._signature_at_mark = {body: self._signature(body) for body in (True, False)}
        self._tensors_at_mark = self._tensors()
        self._config_at_mark = _config_state(self._config)
        before, self._glance = self._glance, self._glance_now()
        if before is not None:
            held = {id(t) for t in self._glance[1]}
            _unwatch((t for t in before[1] if id(t) not in held), self)

    def _glance_now(self) -> tuple[int, list, list[bool], tuple[list[int], list[int]], list[dict]]:
        """What the fast check compares: ``.data`` assignments, the tensor objects (``None`` in empty slots, and
        where they are), the tensors behind them and their versions, and the configs' attribute dicts (shallow
        copies; their values compare by identity first, so this costs microseconds)."""
        tensors = self._slot_tensors()
        present = [t is not None for t in tensors]
        self._config_values = {}
        self._config_objects = _configs(self._config)  # a sub-config replaced shows in its parent's attributes
        versions = _behind_and_versions(list(compress(tensors, present)))
        return _data_assignments, tensors, present, versions, [dict(_attributes(c)) for c in self._config_objects]

    def _unchanged_at_a_glance(self) -> bool:
        """Nothing moved since :meth:`mark` (no scan, no per-tensor tuples): the common case, read in a few
        microseconds per hundred tensors. Anything else takes the full comparison, which decides.

        The same objects in the slots, the same tensors behind them (``swap_tensors`` keeps the object and may
        keep the version number) and the same versions. Versions are read from the tensors the slots hold, with
        tensor subclasses' ``__torch_function__`` off:
        a watched subclass would otherwise make each read look its ``__torch_function__`` up by name (a third of a
        hit's time on small models), and the counter read is the tensor's own either way. (Reading through plain
        detached aliases, as before, avoids that lookup too but touches two more objects per tensor, which a
        request after a computed one finds cold.)"""
        assignments, tensors, present, versions, configs = self._glance
        if assignments != _data_assignments:
            return False
        now = self._slot_tensors()
        if len(now) != len(tensors) or any(map(operator.is_not, now, tensors)):
            return False
        if _behind_and_versions(list(compress(now, present))) != versions:
            return False
        return list(map(_attributes, self._config_objects)) == configs

    def config_value(self, config: Any, name: str) -> Any:
        """``getattr(config, name, False)``, remembered for a config of the model while the glance finds its
        attributes as they were; call it after :meth:`changed` (a request's flags: transformers' config attributes
        run through Python ``__getattribute__`` overrides, tens of microseconds on a cold CPU cache)."""
        key = (id(config), name)
        if key in self._config_values:
            return self._config_values[key]
        value = getattr(config, name, False)
        if any(c is config for c in self._config_objects):  # kept alive there, so the id stays its own
            self._config_values[key] = value
        return value

    @property
    def _config(self) -> Any:
        return getattr(self.model, "config", None)

    def training_module(self) -> str | None:
        """The path of a module of the model in training mode (``""``: the model), or ``None`` when every module is
        in eval mode. Its forward may read ``self.training``: dropout is random then, batch norm updates its
        statistics, PEFT's DoRA skips its cache (torch's layers that never read it are left out: ``_MODE_FREE``).
        Each flag is read from the module's ``__dict__``, the cheapest read of a cold module."""
        if any(map(_TRAINING, self._modes.values())):
            return next(path for path, attributes in self._modes.items() if attributes["training"])
        return next((path for path, module in self._modes_read.items() if module.training), None)

    def requires_grad(self) -> bool:
        """True when some parameter of the stacks' owners requires a gradient (a served entry would have none; a
        head being trained computes after the served states)."""
        return any(p is not None and p.requires_grad for slot in self._slots[True] for p in slot.values())

    # --- adapters and digests -------------------------------------------------------------------------------------
    def adapter_keys(self) -> tuple[str, str] | None:
        """The key spaces of the active adapter sets inside the stacks' owners and outside them (``""``: no adapter
        active), or ``None`` while a mixed-adapter batch runs (rows with different adapters)."""
        if not self._has_adapter_layers:
            return "", ""
        inside = self.inside.state() if self.inside else ()
        outside = self.outside.state() if self.outside else ()
        if inside is None or outside is None:
            return None
        return self._adapter_key(self.inside, inside), self._adapter_key(self.outside, outside)

    def _adapter_key(self, layers: AdapterLayers, state: tuple) -> str:
        if not state:
            return ""
        if state not in self._adapter_keys:
            self._adapter_keys[state] = layers.key(state, self.adapter_digest)
        return self._adapter_keys[state]

    def digest(self) -> str:
        """The digest of every tensor that belongs to no adapter (all bytes; kept until the model changes)."""
        if "" not in self._digests:
            self._digests[""] = tensor_digest(
                (name, tensor) for name, tensor in self._named_tensors() if _adapter_of(name, self._prefixes) is None
            )
        return self._digests[""]

    def adapter_digest(self, adapter: str) -> str:
        """The digest of one adapter's tensors (small: only those are read)."""
        if adapter not in self._digests:
            self._digests[adapter] = tensor_digest(
                (name, tensor) for name, tensor in self._named_tensors() if _adapter_of(name, self._prefixes) == adapter
            )
        return self._digests[adapter]

    def adapters(self) -> list[str]:
        """Every adapter name the model holds."""
        return sorted(set(self._prefixes.values()))

    def _named_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        return named_tensors(self.model)


def _state(tensor: torch.Tensor) -> tuple[int, int, int, int]:
    if tensor.is_meta:  # offloaded: accelerate swaps in a new meta tensor after each forward; the data lives in
        return 0, 0, 0, 0  # its weights map, which is not written in place
    return id(tensor), tensor._cdata, tensor._version, tensor.data_ptr()


def _unwatch(tensors: Iterable[torch.Tensor | None], watch: ModelWatch) -> None:
    """Give ``watch``'s watched tensors their own classes back, except those another attached watch still holds
    (two models may share a tensor: an embedding table, a frozen encoder)."""
    others = [other for other in _attached if other is not watch]
    kept = {id(t) for other in others for t in other._slot_tensors()} if others else set()
    for tensor in tensors:
        if tensor is not None and type(tensor) in _ORIGINAL and id(tensor) not in kept:
            tensor.__class__ = _ORIGINAL[type(tensor)]


def _adapter_of(path: str, prefixes: dict[str, str]) -> str | None:
    """The adapter whose container holds ``path`` (a module or tensor path), if any."""
    if not prefixes:
        return None
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        adapter = prefixes.get(".".join(parts[:end]))
        if adapter is not None:
            return adapter
    return None


def _attributes(config: Any) -> dict[str, Any]:
    """``vars(config)`` without the config class's ``__getattribute__`` override (transformers maps attribute names
    there, two Python calls per read; ``__dict__`` is never mapped): the glance reads it per config per request."""
    return object.__getattribute__(config, "__dict__")


def _configs(config: Any) -> list[Any]:
    """A config and its sub-configs."""
    if config is None:
        return []
    return [
        config,
        *(c for value in vars(config).values() if isinstance(value, PreTrainedConfig) for c in _configs(value)),
    ]


def _config_state(config: Any) -> list[tuple[str, Any]]:
    """A shallow snapshot of a config's attributes that may affect the forward pass, sub-configs expanded
    (reassignments show; values mutated inside a dict do not)."""
    if config is None:
        return []
    state = [
        (name, _config_state(value) if isinstance(value, PreTrainedConfig) else value)
        for name, value in vars(config).items()
        if affects_forward(name)
    ]
    state.append(("attention", attention_kind(getattr(config, "_attn_implementation", None))))
    return state
