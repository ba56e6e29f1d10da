"""The strategy contract: what a strategy gets from the cache (:class:`StrategyContext`) and what it provides
(:class:`Strategy`).

Dependencies point one way: a strategy is built as ``cls(context)`` and uses only the context, a narrow protocol the
controller implements; it never imports the controller. It builds its collaborators (hooks, engines, stores) in
:meth:`Strategy.attach` and hands them what they need as constructor arguments, so they never reach back into it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from ..bank import CacheBank
from ..events import Lookup, Verdict
from ..hooks import HookRegistry
from ..layers import CachedLayer
from ..stats import CacheStats

if TYPE_CHECKING:
    from ..config import LayerCacheConfig, StrategyConfig
    from ..entries import StoredEntry
    from ..models import ModelSpec
    from ..request import RequestScope
    from ..storage import Storage


class SharedStore(Protocol):
    """The second tier (Redis) as strategies see it: fill a bank with entries other replicas computed, and write
    the entries this one computed (``hf_layercache.shared_store.tier.SharedTier``)."""

    def fill(
        self,
        bank: CacheBank,
        digests: list[bytes],
        namespace: int,
        check: Callable[[bytes, dict[str, torch.Tensor]], None] | None = None,
    ) -> list[tuple[bytes, int, StoredEntry]]: ...

    def write(self, bank: CacheBank, entry_id: int | None, digest: bytes, namespace: int, cost: float) -> None: ...


class StrategyContext(Protocol):
    """Everything a strategy may use of the cache it belongs to (the controller implements it)."""

    model: nn.Module
    config: LayerCacheConfig
    layers: list[CachedLayer]
    """The cached layers, in forward order."""
    owners: list[nn.Module]
    """Per layer stack, the pre-trained model holding it (whose forward is a request)."""
    spec: ModelSpec
    hooks: HookRegistry
    """Every attachment goes through it; ``disable`` removes them all."""
    counters: CacheStats
    """Per-layer counters: computed rows and their time, bypassed rows (lookups and verdicts are events, below)."""
    shared: SharedStore | None
    """The shared tier, when ``shared_store`` is set."""

    def record_lookup(
        self, lookup: Lookup, bank: CacheBank | None, layers: list[str], units: tuple[int, int] | None = None
    ) -> None:
        """What a lookup decided, once, for the bank's policy and the stats of ``layers`` (``units``: hits and
        misses counted in other units than lookups, e.g. tokens)."""

    def record_verdict(self, verdict: Verdict, bank: CacheBank | None, layer: str) -> None:
        """What verifying an entry found, once, for the bank's policy and ``layer``'s stats."""

    def build_bank(
        self,
        name: str,
        device: torch.device,
        n_banks: int,
        entry_type: type[StoredEntry],
        expected: Mapping[str, Any] | None = None,
        key_dim: int | None = None,
        storage: Callable[[torch.device | None, torch.dtype | None, int | None, int | None], Storage] | None = None,
        digests_required: bool = False,
    ) -> CacheBank:
        """A bank with the config's policy, its even share of the budget, a backend when ``key_dim`` is given, and
        the storage ``storage(device, dtype, max_entries, max_bytes)`` builds (the default storage otherwise)."""


class Strategy(ABC):
    """What is cached and how it is reused: installs its attachments and owns the banks of the layers it caches.

    Register a subclass with :func:`hf_layercache.register_strategy`; it is built as ``cls(context)`` and declares
    its config fields as a :class:`~hf_layercache.config.StrategyConfig` subclass (:attr:`config_class`). The
    request path is three calls, visible in each strategy's module: :meth:`begin_request` (once per top-level
    forward), :meth:`forward_request` (runs that forward), and, for strategies that hook every layer of a stack,
    :meth:`StackStrategy.start_run` (the stack's first cached layer).
    """

    config_class: ClassVar[type[StrategyConfig] | None] = None
    """The strategy's own config fields (read as ``self.options``); ``None``: it has none."""

    lossless: ClassVar[bool] = False
    """Whether outputs equal uncached ones within :attr:`tolerance` (the conformance suite holds it to that)."""

    tolerance: ClassVar[float] = 1e-4
    """Largest absolute difference from uncached outputs a lossless strategy allows."""

    compiles: ClassVar[bool] = False
    """Whether it works inside ``torch.compile(model)``: its hooks run eagerly behind the compile boundary of
    :mod:`hf_layercache.hooks` and the model's own computation compiles; otherwise a compiled request is refused."""

    shares_entries: ClassVar[bool] = False
    """Whether entries are keyed by digest alone, so replicas can share them through ``shared_store``."""

    intermediate_states_exact: ClassVar[bool] = True
    """False when hits leave intermediate hidden states that differ from real ones, so requests asking for
    ``output_hidden_states`` must run uncached."""

    serves_attention_maps: ClassVar[bool] = False
    """True when every layer still returns the attention maps it actually used on a hit, so requests with
    ``output_attentions`` need not run uncached (the attention strategy)."""

    runs_every_module: ClassVar[bool] = False
    """True when a served request still calls every module's forward (the attention strategy reuses maps inside
    the attention function only), so other code's forward hooks run on real inputs and need not make requests
    compute (:mod:`hf_layercache.foreign_hooks`)."""

    default_verify_fraction: ClassVar[float] = 0.0
    """The share of hits verified when the config's ``verify_fraction`` is ``None``."""

    def __init__(self, context: StrategyContext):
        self.context = context
        self.config = context.config
        self.options = context.config.section(type(self))
        """This strategy's own config fields (an instance of :attr:`config_class`), or ``None``."""
        self.layers = context.layers
        self.banks: dict[str, CacheBank] = {}

    @property
    def hooks(self) -> HookRegistry:
        return self.context.hooks

    @property
    def verify_fraction(self) -> float:
        configured = self.config.verify_fraction
        return self.default_verify_fraction if configured is None else float(configured)

    @abstractmethod
    def attach(self) -> None:
        """Create banks and collaborators, and attach through :attr:`hooks`."""

    def detach(self) -> None:  # noqa: B027 - optional hook
        """Forget state derived from the attachments, which the registry has removed (banks stay: a re-attach, as
        ``copy.deepcopy`` does, is warm)."""

    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Called once per top-level forward with its named arguments, before any layer runs."""

    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """Run one top-level forward. Strategies that work on whole requests (prefix reuse) override this to
        change the call, e.g. compute only a suffix; the default runs it unchanged."""
        return original(**arguments)

    def reset_counters(self) -> None:  # noqa: B027 - optional hook
        """Reset counters the strategy keeps beside ``stats()`` (called by ``clear()``)."""

    def report(self) -> dict[str, Any]:
        """Sections the strategy adds to ``stats()`` (the attention strategy: its gates); none by default."""
        return {}

    def saved_banks(self) -> list[str]:
        """The banks a warm cache holds: all of them, unless some only derive from the others."""
        return list(self.banks)

    def heads_changed(self) -> None:  # noqa: B027 - optional hook
        """A head's weights (outside the stacks' owners) changed: drop what depends on whole-model outputs."""

    def banks_replaced(self) -> None:  # noqa: B027 - optional hook
        """Called after the banks were cleared or loaded from a warm cache, for state derived from their entries."""

    def new_bank(self, name: str, device: torch.device, n_banks: int, entry_type: type[StoredEntry], **options: Any):
        """The bank called ``name`` (``context.build_bank``'s arguments): built on first attach, kept (warm) when the
        strategy is attached again."""
        if name not in self.banks:
            self.banks[name] = self.context.build_bank(name, device, n_banks, entry_type, **options)
        return self.banks[name]
