"""What a strategy stores: a typed entry, and its layout as the named tensors a bank holds and a warm cache saves.

A bank is generic: it keeps a dict of tensors per entry. Each strategy gives that dict a type, a
:class:`StoredEntry` subclass beside the strategy (``ExactEntry``, ``SemanticEntry``, ``AttentionEntry``,
``PrefixBlock``), with the three conversions every entry needs: :meth:`~StoredEntry.to_tensors` to store it,
:meth:`~StoredEntry.from_tensors` to read a stored one, and :meth:`~StoredEntry.validate` to refuse one read from
disk before anything is served from it. Recorded key/value states inside entries share one codec
(:func:`hf_layercache.kv.encode_writes`), and the tenant is the bank's own field (``namespace`` of
:meth:`~hf_layercache.bank.CacheBank.put`), not an entry's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, TypeVar

import torch

E = TypeVar("E", bound="StoredEntry")
T = TypeVar("T", bound="TensorEntry")


class StoredEntry(ABC):
    """A strategy's entry; see the module docstring."""

    @abstractmethod
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The entry as named tensors, each with its own storage (safetensors refuses shared tensors)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls: type[E], values: dict[str, torch.Tensor]) -> E:
        """The entry :meth:`to_tensors` stored (the tensors are the stored ones, not copies)."""

    @classmethod
    @abstractmethod
    def validate(cls, values: dict[str, torch.Tensor], **expected: Any) -> None:
        """Raise ``ValueError`` naming the field unless ``values`` is an entry of the shapes and dtypes ``expected``
        (what the model and config imply) that :meth:`from_tensors` reads."""


def require(
    values: dict[str, torch.Tensor], name: str, dtype: torch.dtype | None, shape: tuple[int | None, ...]
) -> torch.Tensor:
    """The field ``name``; ``ValueError`` when it is missing or not of ``dtype`` (``None``: any floating dtype) and
    ``shape`` (``None``: any size in that dimension)."""
    tensor = values.get(name)
    fits = (
        tensor is not None
        and (tensor.dtype == dtype if dtype is not None else tensor.is_floating_point())
        and tensor.dim() == len(shape)
        and all(want is None or have == want for have, want in zip(tensor.shape, shape, strict=True))
    )
    if not fits:
        wanted = str(dtype).replace("torch.", "") if dtype is not None else "floating"
        shown = (
            "("
            + ", ".join("*" if want is None else str(want) for want in shape)
            + ("," if len(shape) == 1 else "")
            + ")"
        )
        found = "it is missing" if tensor is None else f"found {tensor.dtype} {tuple(tensor.shape)}"
        raise ValueError(f"{name!r} must be a {wanted} tensor of shape {shown}; {found}.")
    return tensor


def refuse_unknown(values: dict[str, torch.Tensor], known: set[str] | frozenset[str], what: str) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unexpected fields {unknown} in {what} (it holds {sorted(known)}).")


class TensorEntry(dict, StoredEntry):
    """An entry that is just named tensors: what a bank holds when it is built without an entry type (tests,
    benchmarks of the bank itself)."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self)

    @classmethod
    def from_tensors(cls: type[T], values: dict[str, torch.Tensor]) -> T:
        return cls(values)

    @classmethod
    def validate(cls, values: dict[str, torch.Tensor], **expected: Any) -> None:
        """Any named tensors."""


def check_finite(values: dict[str, torch.Tensor]) -> None:
    """``ValueError`` for a stored NaN or infinity: no state any layer computed from a real input holds one, so such
    an entry (from disk or from a shared store) is refused rather than served."""
    for name, tensor in values.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name!r} holds NaN or infinite values.")
