"""Entries: their format (field names, the ``meta`` tensor), storing computed rows with their K/V, packing stored
K/V back into a batch, and the checks of entry state read from disk."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...bank import CacheBank
from ...kv import KVWrite
from ...verified import OBSERVATIONS, ErrorBound, check_observations, new_observations
from .alignment import on_device
from .run import SemanticRun

if TYPE_CHECKING:
    from ...config import LayerCacheConfig
    from ...controller import LayerCacheController
    from .hook import SemanticLayerHook

_NAMESPACE, _KV_RECORDED, _SOURCE = 0, 1, slice(2, 6)
"""Fields of an entry's ``meta`` int64 tensor: one small tensor instead of four keeps a store cheap."""
PREDICTION = "prediction"
"""With ``acceptance="argmax"``, the entry field holding its request's prediction (one int64; -1 until known)."""


def entry_meta(namespace: int, kv_recorded: bool, digest: bytes) -> torch.Tensor:
    """An entry's namespace tag, whether it holds K/V, and the digest of its input (to find its siblings in other
    layers' banks), as one int64 tensor."""
    source = torch.frombuffer(bytearray(digest), dtype=torch.int64)
    return torch.cat([torch.tensor([namespace, int(kv_recorded)], dtype=torch.long), source])


def source_digest(values: dict[str, torch.Tensor]) -> bytes:
    return values["meta"][_SOURCE].numpy().tobytes()


def check_prediction(prediction: torch.Tensor) -> None:
    """Refuse a recorded prediction from disk that is not one class index (or -1, unknown)."""
    if prediction.dtype != torch.long or tuple(prediction.shape) != (1,) or int(prediction[0]) < -1:
        raise ValueError(f"'{PREDICTION}' must be an int64 tensor of shape (1,) holding a class index or -1.")


class EntryStore:
    """The part of :class:`~.strategy.SemanticStrategy` that writes entries and reads their K/V back.

    A mixin: the strategy sets these attributes in ``__init__``.
    """

    controller: LayerCacheController
    config: LayerCacheConfig
    banks: dict[str, CacheBank]
    error_bound: ErrorBound | None

    def check_state(self, bank_name: str, state: dict[str, torch.Tensor]) -> None:
        super().check_state(bank_name, state)
        for name, tensor in state.items():
            try:
                if name.endswith(f".{OBSERVATIONS}"):
                    check_observations(tensor)
                elif name.endswith(f".{PREDICTION}"):
                    check_prediction(tensor)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None

    def _store(
        self,
        hook: SemanticLayerHook,
        run: SemanticRun,
        keys: torch.Tensor,
        out: torch.Tensor,
        hidden: torch.Tensor,
        rows: list[int],
        writes: list[KVWrite],
        stored: str,
    ) -> None:
        """Keep what the exact rows among ``rows`` computed: their update (residual) or output (state)."""
        if run.with_kv and not writes:
            return  # an entry without the layer's K/V could not serve a request that needs them
        bank = self.banks[hook.layer.name]
        seconds = self.controller.stats_.seconds_per_row(hook.layer.name)
        for row in rows:
            if not run.exact[row]:
                continue
            pos = on_device(run.positions[row], out.device)
            values = {
                stored: out[row, pos] - hidden[row, pos] if stored == "delta" else out[row, pos],
                **self._entry_fields(run, row),
            }
            if self.error_bound is not None:
                values[OBSERVATIONS] = self._observations_of(bank, run.digests[row])
            if self.config.acceptance == "argmax":
                values[PREDICTION] = torch.full((1,), -1, dtype=torch.long)  # filled once the output is known
            for i, w in enumerate(writes):
                name, kv_pos = f"kv.{i}.{w.tag}.{w.layer_idx}", on_device(pos, w.key.device)
                values[f"{name}.key"] = w.key[row : row + 1][..., kv_pos, :]
                values[f"{name}.value"] = w.value[row : row + 1][..., kv_pos, :]
            bank.put(values, digest=run.digests[row], key=keys[row], cost=seconds)

    @staticmethod
    def _observations_of(bank, digest: bytes) -> torch.Tensor:
        """A new entry's observations: those of the entry of the same input it replaces, if any, else none."""
        entry_id = bank.find(digest)
        old = bank.get(entry_id) if entry_id is not None else None
        return old[OBSERVATIONS].clone() if old is not None and OBSERVATIONS in old else new_observations()

    @staticmethod
    def _entry_fields(run: SemanticRun, row: int) -> dict[str, torch.Tensor]:
        """Fresh copies: entries sharing storage could not be saved (safetensors refuses shared tensors)."""
        if row not in run.entry_fields:
            tokens = run.tokens[row]
            run.entry_fields[row] = {
                "tokens": torch.tensor(tokens if tokens is not None else [], dtype=torch.long),
                "meta": entry_meta(run.namespace, run.with_kv, run.digests[row]),
            }
        return {name: t.clone() for name, t in run.entry_fields[row].items()}

    def _batch_writes(self, run: SemanticRun, entries: list[dict[str, torch.Tensor]]) -> list[KVWrite]:
        """Per-row recorded K/V (real tokens only) placed back at each row's real positions in the padded batch."""
        names = [n[: -len(".key")] for n in entries[0] if n.startswith("kv.") and n.endswith(".key")]
        writes = []
        for name in sorted(names, key=lambda n: int(n.split(".")[1])):
            _, _, tag, layer_idx = name.split(".")
            first = entries[0][f"{name}.key"]
            keys = first.new_zeros((run.batch, first.shape[1], run.mask.shape[1], first.shape[-1]))
            values = keys.clone()
            for row, entry in enumerate(entries):
                pos = on_device(run.positions[row], keys.device)
                keys[row][:, pos] = entry[f"{name}.key"][0].to(keys.device, keys.dtype)
                values[row][:, pos] = entry[f"{name}.value"][0].to(keys.device, keys.dtype)
            writes.append(KVWrite(tag, int(layer_idx), keys, values))
        return writes
