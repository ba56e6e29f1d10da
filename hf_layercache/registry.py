"""Name -> class registries for the pluggable parts: strategies, backends, policies and fingerprints.

A config names its parts by string (``backend="faiss"``); the registry turns the name into the class. Third-party
code adds its own classes with ``register_*`` and the config accepts the new name without any change to the core,
as PEFT does with ``register_peft_method``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A small name -> class mapping with errors that list what is allowed."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str, cls: type[T] | None = None, *, overwrite: bool = False) -> Callable | type[T]:
        """Register ``cls`` under ``name``; without ``cls`` this returns a class decorator."""
        if cls is None:
            return lambda c: self.register(name, c, overwrite=overwrite)
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
        if name in self._classes and self._classes[name] is not cls and not overwrite:
            raise ValueError(
                f"A {self.kind} named {name!r} is already registered ({self._classes[name].__qualname__}); "
                "pass overwrite=True to replace it."
            )
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            raise ValueError(f"Unknown {self.kind} {name!r}; available: {', '.join(self.names())}.") from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a plug-in removed, a test cleaning up); unknown names are ignored."""
        self._classes.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._classes


STRATEGIES: Registry = Registry("strategy")
BACKENDS: Registry = Registry("backend")
POLICIES: Registry = Registry("policy")
FINGERPRINTS: Registry = Registry("fingerprint")


def register_strategy(name: str, cls: type | None = None, *, overwrite: bool = False):
    """Register a :class:`~hf_layercache.strategies.base.Strategy` subclass under ``name``."""
    return STRATEGIES.register(name, cls, overwrite=overwrite)


def register_backend(name: str, cls: type | None = None, *, overwrite: bool = False):
    """Register a :class:`~hf_layercache.backends.base.Backend` subclass under ``name``.

    It is built as ``cls(dim, metric="cosine", device=..., **backend_kwargs)``.
    """
    return BACKENDS.register(name, cls, overwrite=overwrite)


def register_policy(name: str, cls: type | None = None, *, overwrite: bool = False):
    """Register a :class:`~hf_layercache.policies.base.Policy` subclass; it is built as ``cls(**policy_kwargs)``."""
    return POLICIES.register(name, cls, overwrite=overwrite)


def register_fingerprint(name: str, cls: type | None = None, *, overwrite: bool = False):
    """Register a fingerprint class (input -> key vectors) under ``name``."""
    return FINGERPRINTS.register(name, cls, overwrite=overwrite)


def available_strategies() -> list[str]:
    return STRATEGIES.names()


def available_backends() -> list[str]:
    return BACKENDS.names()


def available_policies() -> list[str]:
    return POLICIES.names()


def available_fingerprints() -> list[str]:
    return FINGERPRINTS.names()


def get_strategy(name: str) -> type:
    return STRATEGIES.get(name)


def get_backend(name: str) -> type:
    return BACKENDS.get(name)


def get_policy(name: str) -> type:
    return POLICIES.get(name)


def get_fingerprint(name: str) -> type:
    return FINGERPRINTS.get(name)
