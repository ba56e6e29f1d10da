"""``LayerCacheConfig``: everything a user chooses about a layer cache, validated when it is built."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from .registry import BACKENDS, FINGERPRINTS, POLICIES, STRATEGIES
from .shared.settings import parse_settings

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


def parse_bytes(value: int | str | None, field_name: str = "max_memory") -> int | None:
    """``512`` -> 512, ``"2GB"`` -> 2_000_000_000, ``"1.5GiB"`` -> 1_610_612_736; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field_name} must be a byte count or a string like '512MB', got {value!r}.")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{field_name} must be positive, got {value}.")
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).upper() in _UNITS:
            try:
                number = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
            except OverflowError:  # "9" * 400 + "GB": a float of inf
                number = 0
            if 0 < number < 2**63:
                return number
    raise ValueError(
        f"{field_name}={value!r} is not a size; use a positive int of bytes or a string like '512MB', '2GB', '1GiB'."
    )


@dataclass
class LayerCacheConfig:
    """How a model's layers reuse work across requests.

    Build one and pass it as ``from_pretrained(..., layer_cache=cfg)`` or ``hf_layercache.enable(model, cfg)``.
    Every field is checked when the config is created; a bad value raises ``ValueError`` naming the field, the
    value and what is allowed.
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

    fingerprint: str | None = None
    """How inputs become key vectors for approximate strategies; ``None`` lets the strategy choose (``semantic``:
    ``"minhash"``, token overlap, which on real documents never matched unrelated ones; see docs/semantic.md)."""

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

    bank_device: str = "auto"
    """Where banks live: ``"auto"`` (each bank on its layer's execution device) or ``"cpu"``."""

    # --- declared and validated by the attention strategy (AttentionStrategy.config_fields) ---
    attention_key_dim: int = 64
    """Dimensions of the attention strategy's per-layer lookup key (1 to 128). The key is a random projection of
    the layer's query and key states pooled over position segments; more dimensions separate inputs better but cost
    more per lookup."""

    attention_key_segments: int = 16
    """Position segments the attention strategy's key pools over (1 to 256): with 1 the key is a bag of states and
    ignores order; more segments tell apart inputs whose content sits at other positions."""

    attention_position_tolerance: float = 0.1
    """Largest relative change ``|x - x_stored| / |x_stored|`` of a position's query (key) states for the attention
    strategy to reuse that row (column) of a stored map; rows and columns that changed more are computed fresh.
    ``0`` reuses only positions whose states are bit-identical (lossless). ``threshold`` preselects entries by the
    cosine of their pooled keys."""

    attention_verify_rows: int = 8
    """Query rows (evenly spaced, the last included) the attention strategy recomputes exactly for every candidate
    hit to check it, at ``rows / sequence length`` of the cost of a miss. ``0`` trusts the key similarity alone."""

    attention_max_error: float = 0.2
    """Largest total variation distance (0 to 1) allowed between a served map's verified rows and the exact ones,
    in any head; a candidate above it is a miss. Lower is stricter."""

    attention_gate_interval: int = 16
    """Calls between the attention strategy's gate probes. Per layer and length bucket, the gate measures what a
    hit, a miss and the model's default attention (sdpa) cost here, and the recent reuse rate; where caching is not
    expected to be faster, the layer runs the default attention with no bookkeeping and takes the cached path once
    every this many calls, to notice reusable traffic (up to 8 times as many after probes that found no reuse;
    while caching, it runs the default once per this many calls, to keep measuring it). ``0``: no gate, every
    prefill call takes the cached path."""

    # --- declared and validated by the prefix strategy (PrefixStrategy.config_fields) ---
    block_size: int = 16
    """Tokens per block of the ``prefix`` strategy. A prompt is cut into blocks, each keyed by everything before
    it, and reuse ends at the last complete cached block: small blocks reuse more of a shared prefix that ends
    mid-block, large blocks mean fewer entries and lookups. 16 is vLLM's default."""

    # --- declared and validated by the semantic strategy (SemanticStrategy.config_fields) ---
    reuse: str = "state"
    """How the ``semantic`` strategy reuses a similar earlier input's layer: ``"state"`` (the LLMCache paper)
    replaces the state with the earlier input's and jumps to the deepest layer that hits, so the answer is the earlier
    input's; ``"residual"`` adds that input's layer update (output minus input) to the new input's own state, so the
    new input's information is kept. ``"state"`` is the default: faster at equal or better fidelity on the benchmark
    in docs/semantic.md, which compares them."""

    fingerprint_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the fingerprint class, e.g. ``{"dim": 128}`` or ``{"layers": 2}`` for ``probe``."""

    verify_fraction: float | None = None
    """Fraction (0 to 1) of hits checked by computing the layer anyway; the computed result is served. ``semantic``:
    the measured error goes to the policy's ``on_error`` and to ``stats()``. ``exact``: a hit whose stored output
    disagrees with the computed one (a poisoned or stale entry) is replaced, counted in ``stats()``
    (``audited_unacceptable``) and warned about once. ``prefix``: that share of calls that would reuse blocks is
    computed whole, and each block's stored final states are compared with the computed ones; a block that disagrees
    is dropped with the rest of its chain, counted and warned about once. ``None``: the strategy's default, 0.02 for
    ``semantic``, 0 for ``exact`` and ``prefix`` (lossless by construction; set it to catch entries loaded from an
    unsigned cache, or weights written without torch)."""

    max_error_rate: float | None = None
    """Error-bounded semantic reuse (vCache): the largest probability, above 0 and below 1, that a served hit is
    unacceptable (see ``acceptance``). Each entry learns from verified requests how its similarity relates to
    acceptable reuse, and a hit is served only when the estimated probability of an unacceptable result stays under
    this rate; otherwise the request computes (and the answer teaches the entry). ``threshold`` then only preselects
    the candidates (the nearest entry at or above it), keeping the learned model to similarities where reuse can be
    right. ``None``: the static ``threshold`` alone decides."""

    acceptance: str = "cosine"
    """How a verified hit is judged acceptable, for ``max_error_rate`` and the observed error rate ``stats()``
    reports: ``"cosine"``, the state it would have served is close to the computed one (``acceptance_cosine``), or
    ``"argmax"``, the model's prediction (the argmax of ``output.logits``: a classifier's class, a causal LM's next
    token after the last real token) is the one the entry's own request got, which is what a state hit serves. It needs
    a model with a task head and ``reuse="state"``."""

    acceptance_cosine: float = 0.95
    """With ``acceptance="cosine"``, when a verified hit counts as acceptable: the cosine between the state it would
    have served and the computed one (the row's real tokens flattened together, at the layer where it is served) is
    at least this (-1 to 1)."""

    max_unaligned: float = 0.08
    """Largest fraction (0 to 1) of a new input's tokens that may lack a counterpart in a cached entry of another
    length (token sequences are aligned by a diff); above it the entry is a miss. 0: lengths must match. Requests
    with a KV cache always need equal lengths. A token without a counterpart is served a neighbour's state, so this
    bounds the invented share of a hit: 0.08 lets a greeting put in front of a 60-token text hit, while a reference
    id appended to a 70-token one (0.2 let it hit) moved its embedding below a cosine of 0.95 (docs/semantic.md)."""

    # --- the shared tier of the exact and prefix strategies (declared in their config_fields; docs/shared.md) ---
    shared_store: str | None = None
    """A Redis that replicas share their ``exact`` and ``prefix`` entries through, as a URL:
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

    def __post_init__(self) -> None:
        self._check_registered("strategy", self.strategy, STRATEGIES)
        self._check_registered("backend", self.backend, BACKENDS)
        self._check_registered("policy", self.policy, POLICIES)
        if self.fingerprint is not None:
            self._check_registered("fingerprint", self.fingerprint, FINGERPRINTS)
        for name in ("backend_kwargs", "policy_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must be a dict with string keys, got {value!r}.")
        self._check_policy_kwargs()
        self._check_threshold()
        self._check_layers()
        if self.max_entries is not None and (
            isinstance(self.max_entries, bool) or not isinstance(self.max_entries, int) or self.max_entries < 1
        ):
            raise ValueError(f"max_entries must be a positive int or None, got {self.max_entries!r}.")
        parse_bytes(self.max_memory)
        if self.storage_dtype is not None and self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype={self.storage_dtype!r} is not allowed; use one of {STORAGE_DTYPES} or None."
            )
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ValueError(f"namespace must be a non-empty string, got {self.namespace!r}.")
        if self.integrity_key is not None and (not isinstance(self.integrity_key, str) or not self.integrity_key):
            raise ValueError("integrity_key must be a non-empty string or None (then HF_LAYERCACHE_INTEGRITY_KEY).")
        self._check_shared_store()
        if self.bank_device not in BANK_DEVICES:
            raise ValueError(f"bank_device={self.bank_device!r} is not allowed; use one of {BANK_DEVICES}.")
        for name in STRATEGIES.names():  # each strategy validates the fields it declares, whichever is selected
            STRATEGIES.get(name).check_config(self)

    def _check_shared_store(self) -> None:
        if self.shared_store is None:
            if self.shared_store_kwargs:
                raise ValueError("shared_store_kwargs are given but shared_store is None; set shared_store to a URL.")
            return
        parse_settings(self.shared_store, self.shared_store_kwargs)  # the URL and options, without importing redis
        sharing = [name for name in STRATEGIES.names() if "shared_store" in STRATEGIES.get(name).config_fields]
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
        """Every field but the secret ``integrity_key``, which must never reach a file."""
        data = dataclasses.asdict(self)
        del data["integrity_key"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> LayerCacheConfig:
        """Build from a dict. An unknown key is a ``ValueError`` that names the closest field: a misspelt
        ``"max_memroy"`` must not run without its memory cap. With ``strict=False``, for configs read back from a
        file that a newer version may have written (:meth:`from_json_file`), unknown keys are dropped with a
        warning instead."""
        if not isinstance(data, dict):
            raise ValueError(f"A layer cache config must be a JSON object, got {type(data).__name__}.")
        known = [f.name for f in dataclasses.fields(cls)]
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
