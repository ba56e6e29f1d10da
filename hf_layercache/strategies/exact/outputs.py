"""The whole-request fast path: when every row of a call was answered before, return its output without running
the model at all (no embeddings, no masks, no layer wrappers, no pooler or head).

The layer-stack path still runs everything around the cached layers. For a repeated request that is most of what a
hit costs, so the model's *output* (every tensor field of its ``ModelOutput``) is kept per row beside the stack's
entries, in a bank of its own. A call is answered here when:

* every argument that is not a tensor is a plain value (``None``, bool, int, float, str) and there is no KV cache
  to fill: such calls return a fresh cache object, which an output from the past cannot stand for;
* each row's key (:mod:`.digests`) has an entry made under the same plain arguments, in the *same layout* (padded
  length, first real column): a field that does not run along the sequence (a pooled output, a classifier's
  logits, the logits of ``logits_to_keep``) may depend on where the pads are. Other layouts take the layer-stack
  path, which places the real tokens;
* the model computes the function the entries were computed with: the controller watches the whole model, heads
  included (and clears every bank when it changes), and adapters active in the heads are part of the signature.

Entries are made from the output of every call that fits, when it is computed, so a request's first repeat is
answered here. (Kept only from the first repeat on, a row seen once would be stored once, not twice, but its first
repeat would run the embeddings and head around the stacks' entries: 2.1 ms instead of 0.55 for a batch-1 MiniLM
request, which is most of the repeats that traffic with few duplicates has.) They live in memory only, within the
request bank's share of the memory budget: they are not saved with a warm cache, whose first repeated call refills
them from the stacks' entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.utils import ModelOutput

from ...bank import CacheBank
from ...entries import StoredEntry, refuse_unknown, require
from ...events import Lookup
from ...kv import CACHE_ARGUMENTS
from ...request import namespace_tag
from .digests import RowKey

BANK = "request"
_PLAIN = (type(None), bool, int, float, str)
_SIGNATURES = 256
"""Most remembered signatures: calls differ in few plain arguments; beyond this many, the memo starts over."""


@dataclass
class RequestEntry(StoredEntry):
    """One row of a model's output: each tensor field cut to the row, and the layout it was computed in."""

    fields: dict[str, torch.Tensor]
    """The output's fields that were not ``None``, by name."""
    layout: tuple[int, int, int]
    decoded_once: ClassVar[bool] = True
    """Never changed once stored: the bank reads it from its tensors once (:meth:`CacheBank.find_entry`)."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        values = {f"out.{name}": t for name, t in self.fields.items()}
        values["layout"] = torch.tensor(self.layout, dtype=torch.long)
        return values

    @classmethod
    def from_tensors(cls, values: dict[str, torch.Tensor]) -> RequestEntry:
        fields = {name[len("out.") :]: t for name, t in values.items() if name.startswith("out.")}
        return cls(fields, tuple(values["layout"].tolist()))

    @classmethod
    def validate(cls, values: dict[str, torch.Tensor], **expected: Any) -> None:
        require(values, "layout", torch.long, (3,))
        refuse_unknown({k: v for k, v in values.items() if not k.startswith("out.")}, {"layout"}, "a request entry")


class RequestPath:
    """The fast path of one model (see the module docstring)."""

    def __init__(self, bank: CacheBank, model: torch.nn.Module):
        self.bank = bank
        self.model_name = type(model).__name__
        self._outputs: dict[bytes, _OutputShape] = {}
        """Per call signature (its plain arguments), what its entries rebuild."""
        self._signatures: dict[tuple, bytes] = {}
        """Signatures by the plain arguments' names, types and values and ``head_key``: a repeated call's signature
        is one dict lookup instead of a ``repr`` and a hash."""

    def signature(self, arguments: dict[str, Any], head_key: str) -> bytes | None:
        """A digest of the call's plain arguments and the adapters active in the heads (``head_key``), or ``None``
        when some argument is neither a tensor nor plain (a cache object, a callable) or the call fills a KV cache:
        such calls always run."""
        plain = []
        for name, value in arguments.items():
            if name in CACHE_ARGUMENTS and value is not None:
                return None  # a KV cache to fill (``find_cache``: under a known name, or a ``Cache`` below)
            if isinstance(value, torch.Tensor):
                continue
            if not isinstance(value, _PLAIN):
                return None
            plain.append((name, type(value), value))  # the type too: ``1 == True == 1.0`` as dict keys
        memo = (head_key, *plain)
        signature = self._signatures.get(memo)
        if signature is None:
            described = repr((self.model_name, head_key, sorted((name, value) for name, _, value in plain)))
            signature = hashlib.blake2b(described.encode(), digest_size=16).digest()
            if len(self._signatures) >= _SIGNATURES:
                self._signatures.clear()
            self._signatures[memo] = signature
        return signature

    def serve(self, keys: list[RowKey], namespace: str, signature: bytes) -> tuple[ModelOutput, Lookup] | None:
        """The call's output rebuilt from its rows' entries, or ``None`` unless every row has one in its layout."""
        shape = self._outputs.get(signature)
        if shape is None:
            return None
        tag = namespace_tag(namespace)
        bank = self.bank
        served: list[tuple[int, float]] = []
        rows: list[dict[str, torch.Tensor]] = []
        for key in keys:
            found = bank.find_entry(self._digest(key, signature), tag)
            if found is None:
                return None
            entry_id, entry = found
            if entry.layout != key.layout or entry.fields.keys() != shape.fields.keys():
                return None
            served.append((entry_id, 1.0))
            rows.append(entry.fields)
        return shape.rebuild(rows), Lookup(served)

    def store(self, keys: list[RowKey], namespace: str, signature: bytes, output: Any) -> None:
        """Keep each row of ``output`` when it is a ``ModelOutput`` whose every field has one row per row of the
        batch (a loss, a cache or any other field keeps such calls on the full path)."""
        if not isinstance(output, ModelOutput) or not output:
            return
        batch = len(keys)
        if not all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch for t in output.values()):
            return
        known = self._outputs.get(signature)
        if known is None or not known.describes(output):
            self._outputs[signature] = _OutputShape(output)
        tag = namespace_tag(namespace)
        for row, key in enumerate(keys):
            entry = RequestEntry({name: t[row] for name, t in output.items()}, key.layout)
            self.bank.put(entry, digest=self._digest(key, signature), namespace=tag)

    def clear(self) -> None:
        self.bank.clear()
        self._outputs.clear()

    @staticmethod
    def _digest(key: RowKey, signature: bytes) -> bytes:
        return hashlib.blake2b(key.digest + signature, digest_size=32).digest()


class _OutputShape:
    """What a call's output is made of: its ``ModelOutput`` class and, per field that was not ``None``, the dtype and
    device it had (the bank may store rows in ``storage_dtype`` or elsewhere); rebuilds such outputs from rows.

    A served output must be what the model returns: a new object of its class, with its fields as keys and as
    attributes. The class's own constructor gets there through ``__post_init__``, which reads the dataclass fields
    once per field (about a sixth of a hit on a small model). So the output is assembled directly, ``OrderedDict``
    keys plus attributes, as that constructor leaves them; whether the direct assembly equals the constructor's
    result (same keys in the same order, same attributes) is checked once per class on the output that was stored,
    and a class (or a transformers release) where it does not takes the constructor.
    """

    def __init__(self, output: ModelOutput):
        self.output_type = type(output)
        self.fields = {name: (t.dtype, t.device) for name, t in output.items()}
        self.attributes = dict.fromkeys(f.name for f in dataclasses.fields(output))
        """Every dataclass field, ``None`` unless the output has it: what the constructor sets as attributes."""
        self.direct = _assembles_like_constructor(output, self.attributes)

    def describes(self, output: ModelOutput) -> bool:
        """Whether ``output`` has this class and these fields, dtypes and devices (else it replaces this shape)."""
        return type(output) is self.output_type and {n: (t.dtype, t.device) for n, t in output.items()} == self.fields

    def rebuild(self, rows: list[dict[str, torch.Tensor]]) -> ModelOutput:
        """A new output from one stored row per batch row: each field stacked into a new tensor (never a stored
        one, which the caller could write), in the output's dtype and on its device."""
        values = {}
        for name, (dtype, device) in self.fields.items():
            stacked = torch.stack([row[name] for row in rows])
            values[name] = stacked if stacked.dtype == dtype and stacked.device == device else stacked.to(device, dtype)
        if self.direct:
            return _assemble(self.output_type, self.attributes, values)
        return self.output_type(**values)


def _assemble(output_type: type[ModelOutput], attributes: dict[str, None], values: dict[str, Any]) -> ModelOutput:
    """``output_type(**values)`` as the constructor leaves it (``values`` in field order, none ``None``): the keys in
    the ordered dict, every field as an attribute (``None`` where absent). Nothing else runs."""
    output = output_type.__new__(output_type)
    vars(output).update(attributes, **values)
    for name, value in values.items():
        OrderedDict.__setitem__(output, name, value)
    return output


def _assembles_like_constructor(output: ModelOutput, attributes: dict[str, None]) -> bool:
    """Whether :func:`_assemble` builds from ``output``'s fields what the class's constructor builds."""
    values = dict(output.items())
    try:
        built, direct = type(output)(**values), _assemble(type(output), attributes, values)
    except Exception:  # a class with a constructor of its own: it keeps it
        return False
    return (
        list(built.keys()) == list(direct.keys())
        and _same_objects(dict(built.items()), dict(direct.items()))
        and _same_objects(vars(built), vars(direct))
    )


def _same_objects(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same names, each bound to the very same object (tensors compare by identity here, not by value)."""
    return a.keys() == b.keys() and all(value is b[name] for name, value in a.items())
