"""The exact entry: one row's output of the stack's last cached layer, and the K/V writes its layers made."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...entries import StoredEntry, require
from ...kv import KVWrite, check_writes, decode_writes, encode_writes

_FIELDS = frozenset({"hidden", "kv_recorded"})


@dataclass
class ExactEntry(StoredEntry):
    """What a hit row needs to skip the stack: the last cached layer's output, and (decoders) every cached layer's
    key/value writes, replayed so ``generate()`` continues from the cache an uncached prefill leaves."""

    hidden: torch.Tensor
    """(sequence, hidden) output of the stack's last cached layer."""
    kv_recorded: bool
    """Whether the row ran with a KV cache, so :attr:`writes` holds what a KV cache needs."""
    writes: dict[int, list[KVWrite]]
    """Per cached layer (its position in the stack), its writes cut to this row."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        values = {"hidden": self.hidden, "kv_recorded": torch.tensor(self.kv_recorded)}
        for position, writes in self.writes.items():
            values.update(encode_writes(writes, f"kv.{position}"))
        return values

    @classmethod
    def from_tensors(cls, values: dict[str, torch.Tensor]) -> ExactEntry:
        positions = sorted(_positions(values))
        writes = {position: decode_writes(values, f"kv.{position}") for position in positions}
        return cls(values["hidden"], bool(values["kv_recorded"]), writes)

    @classmethod
    def validate(cls, values: dict[str, torch.Tensor], hidden_size: int | None = None) -> None:
        require(values, "hidden", None, (None, hidden_size))
        require(values, "kv_recorded", torch.bool, ())
        for position in _positions(values):
            check_writes(values, f"kv.{position}")


def _positions(values: dict[str, torch.Tensor]) -> set[int]:
    """The stack positions with stored writes (``kv.<position>.*``); any other unknown field is refused."""
    positions = set()
    for name in values:
        if name in _FIELDS:
            continue
        section, position, *_ = [*name.split("."), ""]
        if section != "kv" or not position.isdigit():
            raise ValueError(f"unexpected field {name!r} (exact entries hold 'hidden', 'kv_recorded', 'kv.<i>.*').")
        positions.add(int(position))
    return positions
