"""Reading a warm cache's shards lazily: each tensor is read from its safetensors file when first asked for."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .persistence import LayerCacheFileError, WarmCache, shard_files


class ShardTensors(Mapping[str, "torch.Tensor"]):
    """The tensors of an opened warm cache, each read from its shard when first asked for.

    Names, shapes and dtypes come from the shard headers, so a bank trimmed to its budget on load
    (:func:`~hf_layercache.bank_state.trim_state`) never reads, or allocates, the entries it drops."""

    def __init__(self, warm: WarmCache):
        self._where: dict[str, Any] = {}
        for path in shard_files(warm.directory, warm.header):
            try:
                shard = safe_open(str(path), framework="pt", device="cpu")
                names = list(shard.keys())
            except (SafetensorError, OSError, RuntimeError, ValueError) as err:
                raise LayerCacheFileError(f"Cannot read layer cache shard {path}: {err}") from None
            twice = [name for name in names if name in self._where]
            if twice:
                raise LayerCacheFileError(f"{path} repeats tensor {twice[0]!r} of another shard of the same cache.")
            self._where.update(dict.fromkeys(names, (path, shard)))

    def __getitem__(self, name: str) -> torch.Tensor:
        path, shard = self._where[name]
        try:
            return shard.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise LayerCacheFileError(f"Cannot read tensor {name!r} of layer cache shard {path}: {err}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def nbytes(self, name: str) -> int:
        """Bytes of tensor ``name``'s data, from its shard's header alone."""
        tensor = self._where[name][1].get_slice(name)
        return math.prod(tensor.get_shape()) * _DTYPE_BYTES.get(tensor.get_dtype(), 8)

    def by_bank(self) -> dict[str, BankTensors]:
        """The tensors grouped by bank (the part of each name before ``/``); a name without one raises."""
        names: dict[str, list[str]] = {}
        for name in self._where:
            bank, sep, _ = name.partition("/")
            if not sep:
                raise LayerCacheFileError(f"Tensor {name!r} of a layer cache names no bank ('<bank>/<tensor>').")
            names.setdefault(bank, []).append(name)
        return {bank: BankTensors(self, bank, listed) for bank, listed in names.items()}


class BankTensors(Mapping[str, "torch.Tensor"]):
    """One bank's tensors of a :class:`ShardTensors`, named as the bank's ``state_dict`` names them."""

    def __init__(self, tensors: ShardTensors, bank: str, names: list[str]):
        self._tensors, self._prefix = tensors, f"{bank}/"
        self._names = [name[len(self._prefix) :] for name in names]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[self._prefix + name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def nbytes(self, name: str) -> int:
        return self._tensors.nbytes(self._prefix + name)


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2}
_DTYPE_BYTES.update({"I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8})


def read_tensors(warm: WarmCache) -> ShardTensors:
    """Every tensor of an opened warm cache, loaded on CPU when first read."""
    return ShardTensors(warm)
