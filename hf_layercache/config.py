"""``LayerCacheConfig``: everything a user chooses about a layer cache, validated when it is built."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .registry import BACKENDS, POLICIES, STRATEGIES
from .request import check_namespace
from .shared_store.settings import parse_settings

CONFIG_NAME = "layer_cache_config.json"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
BANK_DEVICES = ("auto", "cpu")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
MAX_COUNT = 2**63 - 1
"""Largest ``max_entries`` and ``max_memory``: entry ids, sizes and slot counts become int64 tensors (saved states,
slabs), which cannot hold more; a larger limit is no limit, so ``None`` says it."""


def parse_bytes(value: int | str | None, field_name: str = "max_memory") -> int | None:
    """``512`` -> 512, ``"2GB"`` -> 2_000_000_000, ``"1.5GiB"`` -> 1_610_612_736; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field_name} must be a byte count or a string like '512MB', got {value!r}.")
    if isinstance(value, int):
        if not 0 < value <= MAX_COUNT:
            raise ValueError(f"{field_name} must be positive and at most 2**63 - 1 bytes, got {value}.")
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).upper() in _UNITS:
            try:
                number = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
            except OverflowError:  # "9" * 400 + "GB": a float of inf
                number = 0
            if 0 < number <= MAX_COUNT:
                return number
    raise ValueError(
        f"{field_name}={value!r} is not a size; use a positive int of bytes or a string like '512MB', '2GB', '1GiB'."
    )


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float | None,
    *,
    integer: bool = False,
    open_low: bool = False,
    open_high: bool = False,
    what: str | None = None,
) -> None:
    """``ValueError`` naming the field unless ``value`` is a finite number (an int when ``integer``) in
    ``[low, high]`` (bounds excluded where ``open_*``; ``high=None``: no upper bound). NaN and infinities are refused
    even where no bound catches them: no count, size or fraction the code uses can be one."""
    kinds = int if integer else int | float
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) or math.isfinite(value))
    ok = ok and (value > low if open_low else value >= low)
    ok = ok and (high is None or (value < high if open_high else value <= high))
    if not ok:
        allowed = what or (f"an int from {low} to {high}" if integer else f"a number in [{low}, {high}]")
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


@dataclass
class StrategyConfig:
    """A strategy's own config fields, declared once (PEFT's config-per-method): subclass it as a dataclass, give
    every field a docstring and check values in ``__post_init__``, and name it as the strategy class's
    ``config_class``. ``LayerCacheConfig`` accepts the fields flat (``LayerCacheConfig(block_size=32)``), saves them
    flat, and builds every registered strategy's section, so a bad value is refused whichever strategy is
    selected."""

    reads: ClassVar[tuple[str, ...]] = ()
    """The common :class:`LayerCacheConfig` fields the strategy reads (``hf-layercache inspect`` shows those)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def check_with(self, config: LayerCacheConfig) -> None:
        """Checks that need the rest of the config (which strategy is selected); ``ValueError`` naming the field."""


def _sections() -> dict[str, type[StrategyConfig]]:
    """The config class of every registered strategy that has one, by strategy name."""
    return {
        name: STRATEGIES.get(name).config_class
        for name in STRATEGIES.names()
        if getattr(STRATEGIES.get(name), "config_class", None) is not None
    }


def _default(name: str, sections: dict[str, type[StrategyConfig]]) -> Any:
    """The default of a common field or of a strategy's field."""
    classes = [LayerCacheConfig, *(s for s in sections.values() if name in s.field_names())]
    declared = next(f for cls in classes for f in dataclasses.fields(cls) if f.name == name)
    return declared.default_factory() if declared.default_factory is not dataclasses.MISSING else declared.default


def _owners(sections: dict[str, type[StrategyConfig]]) -> dict[str, type[StrategyConfig]]:
    """Each strategy field's config class; a name two strategies declare is an error."""
    owners: dict[str, type[StrategyConfig]] = {}
    for strategy, section in sections.items():
        for name in section.field_names():
            if name in owners and owners[name] is not section:
                raise ValueError(f"config field {name!r} is declared by two strategies' config classes ({strategy}).")
            owners[name] = section
    return owners


@dataclass
class LayerCacheConfig:
    """How a model's layers reuse work across requests.

    Build one and pass it as ``from_pretrained(..., layer_cache=cfg)`` or ``hf_layercache.enable(model, cfg)``.
    Every field is checked when the config is created; a bad value raises ``ValueError`` naming the field, the
    value and what is allowed. The fields below are common to every strategy; each strategy declares its own in
    its config class (``block_size`` in ``PrefixConfig``, the ``attention_*`` fields in ``AttentionConfig``, ...),
    which are given and read flat all the same: ``LayerCacheConfig(strategy="prefix", block_size=32).block_size``.
    """

    strategy: str = "exact"
    """What is reused: ``"exact"`` (lossless, identical inputs skip every layer), ``"prefix"`` (lossless, causal
    decoders reuse a shared prompt prefix), ``"semantic"`` (approximate layer reuse for similar inputs) or
    ``"attention"`` (approximate attention-map reuse), or any name given to ``register_strategy``."""

    backend: str = "auto"
    """Similarity index for approximate strategies: ``"auto"`` (exact search while a bank is small, then a FAISS IVF
    index, chosen from measurements in docs/backends.md), ``"exact"``, ``"faiss"``, ``"annoy"`` or a registered name."""

    backend_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the backend class, e.g. ``{"index": "HNSW32"}`` for FAISS."""

    policy: str = "lru"
    """Eviction policy of every bank: ``"lru"`` or another registered name (see ``available_policies()``)."""

    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the policy class, e.g. ``{"half_life": 1000}`` for staleness."""

    threshold: float | list[float] = 0.85
    """Minimum similarity for an approximate hit, one float or one per cached layer; higher is stricter, exact
    strategies ignore it. Its meaning is the fingerprint's: with ``semantic``'s default ``"minhash"`` it is the share
    of token pairs (bigrams) two inputs have in common, their Jaccard similarity, checked exactly before a hit is
    served (0.85: a 100-token text with a few numbers changed or a greeting added hits; one changed word in a
    20-token sentence does not); with the embedding fingerprints, the cosine of their keys."""

    layers: list[int] | list[str] | str | None = None
    """Which layers are cached. ``None``: every layer found automatically. A list of ints: indices into the found
    layers (in forward order, encoder before decoder). A string or list of strings: module paths of layer stacks
    (``"encoder.layer"``) or single layers, for models the automatic discovery does not know."""

    max_entries: int | None = 10_000
    """Most entries one bank holds; ``None`` for no count limit."""

    max_memory: int | str | None = None
    """Byte budget for all banks together (values, keys and index), an int or a string like ``"2GB"``. Split
    evenly between the banks. ``None``: no byte limit."""

    storage_dtype: str | None = None
    """dtype of stored values: ``"float32"``, ``"float16"``, ``"bfloat16"``, or ``None`` to keep the model's. The
    exact strategy stays lossless only when this is ``None`` or the model's own dtype."""

    namespace: str = "default"
    """Tenant of the entries this model stores and may be served; entries never cross namespaces."""

    namespace_quota: float | None = None
    """Share (0 to 1] of each bank's ``max_entries`` and byte budget one namespace may hold. A tenant at its quota
    evicts its own entries (in the policy's order) to store more, so another tenant's traffic cannot evict a
    tenant's entries while the quotas of the tenants sum to at most 1 (e.g. 0.25 for four tenants); beyond that,
    the budget left over is shared by the policy's order. Needs ``max_entries`` or ``max_memory``. ``None``: tenants
    share the budget, and one tenant's new entries may evict another's (docs/reliability.md, "Tenant isolation")."""

    bank_device: str = "auto"
    """Where banks live: ``"auto"`` (each bank on its layer's execution device) or ``"cpu"``."""

    verify_fraction: float | None = None
    """Fraction (0 to 1) of hits checked by computing the layer anyway; the computed result is served. ``semantic``:
    the measured error goes to the policy's ``on_error`` and to ``stats()``. ``exact``: a hit whose stored output
    disagrees with the computed one (a poisoned or stale entry) is replaced, counted in ``stats()``
    (``audited_unacceptable``) and warned about once. ``prefix``: that share of calls that would reuse blocks is
    computed whole, and each block's stored final states are compared with the computed ones; a block that disagrees
    is dropped with the rest of its chain, counted and warned about once. ``None``: the strategy's default, 0.02 for
    ``semantic``, 0 for ``exact`` and ``prefix`` (lossless by construction; set it to catch entries loaded from an
    unsigned cache, or weights written without torch)."""

    # --- the shared tier of the exact and prefix strategies (declared in their config_fields; docs/shared.md) ---
    shared_store: str | None = None
    """A Redis that replicas share their ``exact``, ``prefix`` and ``segment`` entries through, as a URL:
    ``redis://host:port/db``, ``rediss://`` for TLS, ``unix:///path/to/redis.sock``. The local bank stays the first
    tier; a local miss asks Redis (one round trip per batch), computed entries are written to it in the background,
    and any Redis trouble means computing as uncached. No password in the URL (it is saved with the config): see
    ``password_env``. Needs ``pip install 'hf-layercache[redis]'``. ``None``: entries stay in this process."""

    shared_store_kwargs: dict[str, Any] = field(default_factory=dict)
    """Options of the shared store: ``socket_timeout`` and ``connect_timeout`` (seconds, default 0.25),
    ``retry_interval`` (seconds Redis is left alone after an error, default 5), ``ttl`` (seconds, default ``None``:
    Redis's ``maxmemory-policy`` evicts), ``password_env`` (the environment variable holding the password),
    ``key_prefix`` (default ``"hf_layercache"``), ``queue_size`` (entries waiting to be written, default 256)."""

    integrity_key: str | None = field(default=None, repr=False)
    """Secret for HMAC-SHA256 signatures on saved caches (and shared-store values): saves sign the header and every
    shard, loads refuse unsigned or wrongly signed caches. ``None`` reads the ``HF_LAYERCACHE_INTEGRITY_KEY``
    environment variable; unset there too, caches are unsigned and trusted like the weights beside them. Never
    written to disk: ``to_dict`` leaves it out."""

    options: dict[str, Any] = field(default_factory=dict)
    """The strategies' own fields, flat (every registered strategy's, defaults filled in): what ``cfg.block_size``
    reads. Give them as keyword arguments; this field exists so that ``dataclasses.replace`` keeps them."""

    def __init__(self, **fields: Any) -> None:
        common = {f.name: f for f in dataclasses.fields(LayerCacheConfig) if f.name != "options"}
        options = dict(fields.pop("options", None) or {})
        for name, declared in common.items():
            if name in fields:
                value = fields.pop(name)
            elif declared.default_factory is not dataclasses.MISSING:
                value = declared.default_factory()
            else:
                value = declared.default
            object.__setattr__(self, name, value)
        options.update(fields)  # everything else must be a registered strategy's field (checked below)
        object.__setattr__(self, "options", options)
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        options = self.__dict__.get("options")
        if options is not None and name in options and name not in self.__dataclass_fields__:
            options[name] = value
        else:
            object.__setattr__(self, name, value)

    def section(self, strategy_cls: type) -> StrategyConfig | None:
        """The strategy class's own fields as its config class (``None`` when it declares none)."""
        section = getattr(strategy_cls, "config_class", None)
        if section is None:
            return None
        return section(**{name: self.options[name] for name in section.field_names() if name in self.options})

    def __post_init__(self) -> None:
        self._check_registered("strategy", self.strategy, STRATEGIES)
        self._check_registered("backend", self.backend, BACKENDS)
        self._check_registered("policy", self.policy, POLICIES)
        for name in ("backend_kwargs", "policy_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must be a dict with string keys, got {value!r}.")
        self._check_policy_kwargs()
        self._check_threshold()
        self._check_layers()
        self._check_threshold_per_layer()
        if self.max_entries is not None:
            check_number(
                "max_entries",
                self.max_entries,
                1,
                MAX_COUNT,
                integer=True,
                what="a positive int up to 2**63 - 1, or None",
            )
        parse_bytes(self.max_memory)
        if self.storage_dtype is not None and self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype={self.storage_dtype!r} is not allowed; use one of {STORAGE_DTYPES} or None."
            )
        check_namespace(self.namespace)
        self._check_namespace_quota()
        if self.integrity_key is not None and (not isinstance(self.integrity_key, str) or not self.integrity_key):
            raise ValueError("integrity_key must be a non-empty string or None (then HF_LAYERCACHE_INTEGRITY_KEY).")
        self._check_shared_store()
        if self.bank_device not in BANK_DEVICES:
            raise ValueError(f"bank_device={self.bank_device!r} is not allowed; use one of {BANK_DEVICES}.")
        if self.verify_fraction is not None:
            check_number("verify_fraction", self.verify_fraction, 0.0, 1.0, what="a fraction in [0, 1], or None")
        self._check_options()
        self._warn_unread()

    def _warn_unread(self) -> None:
        """Warn about fields set away from their defaults that the selected strategy does not read (``threshold``
        with ``strategy="exact"``, ``block_size`` with ``"semantic"``): they would change nothing, silently. A
        strategy without a config class declares nothing, so nothing is said."""
        sections = _sections()
        selected = sections.get(self.strategy)
        if selected is None:
            return
        readers: dict[str, list[str]] = {}
        for strategy, section in sections.items():
            for name in (*section.reads, *section.field_names()):
                readers.setdefault(name, []).append(strategy)
        read = {*selected.reads, *selected.field_names()}
        unread = [
            f"{name}={getattr(self, name)!r} (read by {', '.join(repr(s) for s in strategies)})"
            for name, strategies in readers.items()
            if name not in read and getattr(self, name) != _default(name, sections)
        ]
        if unread:
            warnings.warn(
                f"LayerCacheConfig(strategy={self.strategy!r}) does not read {'; '.join(unread)}: "
                "they change nothing with this strategy.",
                stacklevel=4,
            )

    def _check_options(self) -> None:
        """Every strategy field given belongs to a registered strategy; each registered strategy's section is built
        (its ``__post_init__`` checks its fields, whichever strategy is selected) and fills in its defaults."""
        sections = _sections()
        owners = _owners(sections)
        unknown = sorted(name for name in self.options if name not in owners)
        if unknown:
            known = [*(f.name for f in dataclasses.fields(LayerCacheConfig) if f.name != "options"), *owners]
            raise ValueError(f"Unknown {_unknown_keys(unknown, known)}; the fields are in docs/configuration.md.")
        for section in dict.fromkeys(sections.values()):
            built = section(**{name: self.options[name] for name in section.field_names() if name in self.options})
            built.check_with(self)
            self.options.update(dataclasses.asdict(built))

    def _check_namespace_quota(self) -> None:
        if self.namespace_quota is None:
            return
        check_number(
            "namespace_quota", self.namespace_quota, 0.0, 1.0, open_low=True, what="a share in (0, 1], or None"
        )
        if self.max_entries is None and self.max_memory is None:
            raise ValueError("namespace_quota is a share of max_entries or max_memory; set one of them, or None.")

    def _check_shared_store(self) -> None:
        if self.shared_store is None:
            if self.shared_store_kwargs:
                raise ValueError("shared_store_kwargs are given but shared_store is None; set shared_store to a URL.")
            return
        parse_settings(self.shared_store, self.shared_store_kwargs)  # the URL and options, without importing redis
        sharing = [name for name in STRATEGIES.names() if getattr(STRATEGIES.get(name), "shares_entries", False)]
        if self.strategy not in sharing:
            raise ValueError(
                f"shared_store is supported by strategies {sharing}, not {self.strategy!r}: its lookups search a "
                "similarity index that lives in the process (docs/shared.md). Set shared_store=None."
            )

    @staticmethod
    def _check_registered(field_name: str, value: Any, registry) -> None:
        if not isinstance(value, str) or value not in registry:
            raise ValueError(f"{field_name}={value!r} is not available; allowed: {', '.join(registry.names())}.")

    def _check_policy_kwargs(self) -> None:
        # Policies are cheap to build: building one now turns a misspelt kwarg into an error at config time.
        try:
            POLICIES.get(self.policy)(**self.policy_kwargs)
        except TypeError as err:
            raise ValueError(f"policy_kwargs={self.policy_kwargs!r} do not fit policy {self.policy!r}: {err}") from None

    def _check_threshold(self) -> None:
        values = self.threshold if isinstance(self.threshold, list | tuple) else [self.threshold]
        if isinstance(self.threshold, tuple):
            self.threshold = list(self.threshold)
        if not values or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and -1.0 <= v <= 1.0 for v in values
        ):
            raise ValueError(
                f"threshold must be a cosine similarity in [-1, 1] or a non-empty list of them, got {self.threshold!r}."
            )

    def _check_threshold_per_layer(self) -> None:
        """A threshold list for layers given by index needs one value per layer: a short list fails on the first
        request (``threshold_for``), a long one would be cut silently. With ``layers=None`` or module paths the
        count is known only when the model is (``threshold_for`` says so then)."""
        layers, threshold = self.layers, self.threshold
        by_index = isinstance(layers, list) and all(isinstance(x, int) for x in layers)
        if by_index and isinstance(threshold, list) and len(threshold) != len(layers):
            raise ValueError(
                f"threshold has {len(threshold)} values for {len(layers)} cached layers (layers={layers!r}); give one "
                "threshold per cached layer, or a single float for all."
            )

    def _check_layers(self) -> None:
        layers = self.layers
        if layers is None or (isinstance(layers, str) and layers):
            return
        if isinstance(layers, tuple):
            layers = self.layers = list(layers)
        if isinstance(layers, list) and layers:
            if all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
                if len(set(layers)) == len(layers):
                    return
            elif all(isinstance(x, str) and x for x in layers):
                return
        raise ValueError(
            f"layers={self.layers!r} is not allowed; use None (all layers), a list of distinct non-negative layer "
            "indices, or module paths such as 'encoder.layer' (a string or a list of strings)."
        )

    @property
    def max_memory_bytes(self) -> int | None:
        return parse_bytes(self.max_memory)

    def threshold_for(self, position: int) -> float:
        """The threshold of the ``position``-th cached layer."""
        if isinstance(self.threshold, list):
            if position >= len(self.threshold):
                raise ValueError(
                    f"threshold has {len(self.threshold)} values but layer position {position} is cached; "
                    "give one threshold per cached layer."
                )
            return float(self.threshold[position])
        return float(self.threshold)

    # --- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, the strategies' flat beside the common ones, but the secret ``integrity_key``, which must
        never reach a file."""
        data = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("options", "integrity_key")
        }
        return copy.deepcopy({**data, **self.options})

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> LayerCacheConfig:
        """Build from a dict. An unknown key is a ``ValueError`` that names the closest field: a misspelt
        ``"max_memroy"`` must not run without its memory cap. With ``strict=False``, for configs read back from a
        file that a newer version may have written (:meth:`from_json_file`), unknown keys are dropped with a
        warning instead."""
        if not isinstance(data, dict):
            raise ValueError(f"A layer cache config must be a JSON object, got {type(data).__name__}.")
        known = [f.name for f in dataclasses.fields(cls) if f.name != "options"] + list(_owners(_sections()))
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            if strict:
                raise ValueError(f"Unknown {_unknown_keys(unknown, known)}; the fields are in docs/configuration.md.")
            warnings.warn(f"Ignoring unknown {_unknown_keys(unknown, known)}.", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, *, strict: bool = False) -> LayerCacheConfig:
        """Read a config saved by :meth:`to_json_file` or a warm cache's ``layer_cache_config.json``. Unknown keys
        (a newer version's fields) are dropped with a warning; ``strict=True`` refuses them as :meth:`from_dict`
        does, for a file a person wrote."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except RecursionError:
                raise ValueError(f"{path} is nested too deeply to be a layer cache config.") from None
        if isinstance(data, dict) and "config" in data and isinstance(data["config"], dict):
            data = data["config"]  # a warm cache's layer_cache_config.json wraps the config with its metadata
        return cls.from_dict(data, strict=strict)


def _unknown_keys(unknown: list[str], known: list[str]) -> str:
    """``layer cache config key 'max_memroy' (did you mean 'max_memory'?)``, for one key or several."""
    described = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        described.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return f"layer cache config key{'s' if len(unknown) > 1 else ''} {', '.join(described)}"
