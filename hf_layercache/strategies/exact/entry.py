"""The exact entry: one row's output of the stack's last cached layer, and the K/V writes its layers made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...entries import StoredEntry, require
from ...kv import KVWrite, check_writes, decode_writes, encode_writes

_FIELDS = frozenset({"hidden", "kv_recorded", "layout"})


@dataclass
class ExactEntry(StoredEntry):
    """What a hit row needs to skip the stack: the last cached layer's output, and (decoders) every cached layer's
    key/value writes, replayed so ``generate()`` continues from the cache an uncached prefill leaves."""

    hidden: torch.Tensor
    """(padded length, hidden) output of the stack's last cached layer, pad positions included, as computed."""
    layout: tuple[int, int, int]
    """``(padded length, first real column, real tokens)`` of the batch it was computed in
    (:attr:`~.digests.RowKey.layout`): served as stored in that layout, its real tokens placed in any other."""
    kv_recorded: bool
    """Whether the row ran with a KV cache, so :attr:`writes` holds what a KV cache needs."""
    writes: dict[int, list[KVWrite]]
    """Per cached layer (its position in the stack), its writes cut to this row's real tokens."""
    decoded_once: ClassVar[bool] = True
    """Never changed once stored: the bank reads it from its tensors once (:meth:`CacheBank.find_entry`)."""

    @property
    def real(self) -> slice:
        _, first, n = self.layout
        return slice(first, first + n)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        values = {
            "hidden": self.hidden,
            "layout": torch.tensor(self.layout, dtype=torch.long),
            "kv_recorded": torch.tensor(self.kv_recorded),
        }
        for position, writes in self.writes.items():
            values.update(encode_writes(writes, f"kv.{position}"))
        return values

    @classmethod
    def from_tensors(cls, values: dict[str, torch.Tensor]) -> ExactEntry:
        positions = sorted(_positions(values))
        writes = {position: decode_writes(values, f"kv.{position}") for position in positions}
        layout = tuple(values["layout"].tolist())
        return cls(values["hidden"], layout, bool(values["kv_recorded"]), writes)

    @classmethod
    def validate(cls, values: dict[str, torch.Tensor], hidden_size: int | None = None) -> None:
        hidden = require(values, "hidden", None, (None, hidden_size))
        length, first, n = require(values, "layout", torch.long, (3,)).tolist()
        if length != hidden.shape[0] or first < 0 or n < 1 or first + n > length:
            raise ValueError(
                f"'layout' {[length, first, n]} must be [padded length {hidden.shape[0]}, first real column, real "
                "tokens] with the real tokens inside the row."
            )
        require(values, "kv_recorded", torch.bool, ())
        for position in _positions(values):
            prefix = f"kv.{position}"
            check_writes(values, prefix)
            for write in decode_writes(values, prefix):
                if write.tag == "self" and write.key.shape[-2] != n:  # cross-attention covers the encoder's tokens
                    raise ValueError(f"{prefix}.*: stored K/V cover {write.key.shape[-2]} tokens; the row has {n}.")


def _positions(values: dict[str, torch.Tensor]) -> set[int]:
    """The stack positions with stored writes (``kv.<position>.*``); any other unknown field is refused."""
    positions = set()
    for name in values:
        if name in _FIELDS:
            continue
        section, position, *_ = [*name.split("."), ""]
        if section != "kv" or not position.isdigit():
            raise ValueError(f"unexpected field {name!r} (exact entries hold {sorted(_FIELDS)} and 'kv.<i>.*').")
        positions.add(int(position))
    return positions
