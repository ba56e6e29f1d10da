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

Entries are made from the output of any call that fits (hits included: their outputs are exact) and live in memory
only, within the memory budget: they are not saved with a warm cache, whose first repeated call refills them from
the stack's entries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from ...bank import CacheBank
from ...entries import StoredEntry, refuse_unknown, require
from ...events import Lookup
from ...kv import find_cache
from ...request import namespace_tag
from .digests import RowKey

BANK = "request"
_PLAIN = (type(None), bool, int, float, str)


@dataclass
class RequestEntry(StoredEntry):
    """One row of a model's output: each tensor field cut to the row, and the layout it was computed in."""

    fields: dict[str, torch.Tensor]
    """The output's fields that were not ``None``, by name."""
    layout: tuple[int, int, int]

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
        self._outputs: dict[bytes, tuple[type[ModelOutput], dict[str, tuple[torch.dtype, torch.device]]]] = {}
        """Per call signature (its plain arguments), the output class its entries rebuild and its fields, with the
        dtype and device each had (the bank may store them in ``storage_dtype`` or elsewhere)."""

    def signature(self, arguments: dict[str, Any], head_key: str) -> bytes | None:
        """A digest of the call's plain arguments and the adapters active in the heads (``head_key``), or ``None``
        when some argument is neither a tensor nor plain (a cache object, a callable) or the call fills a KV cache:
        such calls always run."""
        if find_cache(arguments) is not None:
            return None
        plain = {}
        for name, value in arguments.items():
            if isinstance(value, torch.Tensor):
                continue
            if not isinstance(value, _PLAIN):
                return None
            plain[name] = value
        described = repr((self.model_name, head_key, sorted(plain.items())))
        return hashlib.blake2b(described.encode(), digest_size=16).digest()

    def serve(self, keys: list[RowKey], namespace: str, signature: bytes) -> tuple[ModelOutput, Lookup] | None:
        """The call's output rebuilt from its rows' entries, or ``None`` unless every row has one in its layout."""
        if signature not in self._outputs:
            return None
        output_type, names = self._outputs[signature]
        tag = namespace_tag(namespace)
        rows: list[tuple[int, RequestEntry]] = []
        for key in keys:
            entry_id = self.bank.find(self._digest(key, signature))
            entry = self.bank.get(entry_id, tag) if entry_id is not None else None
            if entry is None or entry.layout != key.layout or set(entry.fields) != set(names):
                return None
            rows.append((entry_id, entry))
        fields = {
            name: torch.stack([entry.fields[name] for _, entry in rows]).to(device=device, dtype=dtype)
            for name, (dtype, device) in names.items()
        }
        return output_type(**fields), Lookup([(entry_id, 1.0) for entry_id, _ in rows])

    def store(self, keys: list[RowKey], namespace: str, signature: bytes, output: Any) -> None:
        """Keep each row of ``output`` when it is a ``ModelOutput`` whose every field has one row per row of the
        batch (a loss, a cache or any other field keeps such calls on the full path)."""
        if not isinstance(output, ModelOutput) or not output:
            return
        batch = len(keys)
        if not all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch for t in output.values()):
            return
        names = {name: (t.dtype, t.device) for name, t in output.items()}
        self._outputs[signature] = (type(output), names)
        tag = namespace_tag(namespace)
        for row, key in enumerate(keys):
            entry = RequestEntry({name: output[name][row] for name in names}, key.layout)
            self.bank.put(entry, digest=self._digest(key, signature), namespace=tag)

    def clear(self) -> None:
        self.bank.clear()
        self._outputs.clear()

    @staticmethod
    def _digest(key: RowKey, signature: bytes) -> bytes:
        return hashlib.blake2b(key.digest + signature, digest_size=32).digest()
