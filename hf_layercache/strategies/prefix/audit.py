"""Auditing the stored blocks: a call drawn by ``verify_fraction`` is computed whole, and every block it would have
reused is compared with the final hidden states the model just computed at its positions."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ...bank import CacheBank
from ...events import Verdict
from ...request import RequestScope
from .base_call import BaseModelCall
from .run import Row

RecordVerdict = Callable[[Verdict, CacheBank, str], None]


class CallAudit:
    """Computes a drawn call whole and checks the blocks its rows would have reused against it. A block that
    disagrees (stale, or altered since it was stored) is dropped with the rest of its row's chain, and reported
    once: the blocks after it were computed from the same states, so none of them can be trusted either."""

    def __init__(
        self,
        bank: CacheBank,
        block_size: int,
        base_call: BaseModelCall,
        record_verdict: RecordVerdict,
        layer: str,
    ):
        self.bank = bank
        self.block_size = block_size
        self.base_call = base_call
        self.record_verdict = record_verdict
        self.layer = layer
        """The layer whose stats hear the verdicts (the last: a block's hidden states are the stack's output)."""
        self._warned = False

    def check(
        self, scope: RequestScope, forward: Callable[..., Any], arguments: dict[str, Any], rows: list[Row]
    ) -> Any:
        """The call's output, computed whole; the rows are left computed whole (nothing reused, nothing stored)."""
        captured: list[torch.Tensor] = []

        def capture(base_output: Any) -> None:  # returns None: the output is read, not replaced
            captured.append(base_output[0])

        output = self.base_call.call(scope, forward, arguments, capture)
        fresh = captured[0]
        tolerance = max(1e-4, 8 * torch.finfo(fresh.dtype).eps)
        with self.bank.lock:
            for r, row in enumerate(rows):
                ids = [*row.found, *([row.tail[0]] if row.tail else [])]
                sizes = [self.block_size] * len(row.found) + ([row.tail[1]] if row.tail else [])
                for index, (entry_id, block) in enumerate(zip(ids, row.entries, strict=True)):
                    if not self.bank.holds(entry_id, "key", block.key):
                        break
                    column = row.first + index * self.block_size
                    computed = fresh[r, column : column + sizes[index]].float()
                    stored = block.hidden[: sizes[index]].to(computed.device).float()
                    agrees = torch.allclose(stored, computed, rtol=tolerance, atol=tolerance)
                    error = ((stored - computed).norm() / computed.norm().clamp_min(1e-12)).item()
                    self.record_verdict(Verdict(entry_id, error, agrees, explored=False), self.bank, self.layer)
                    if not agrees:
                        self._drop_chain(ids[index:], error)
                        break
        for row in rows:
            row.compute_whole()
        return output

    def _drop_chain(self, entry_ids: list[int], error: float) -> None:
        for entry_id in entry_ids:
            self.bank.remove(entry_id)
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"A prefix block disagrees with the model it stands for (relative error {error:.3g}): it was dropped "
                "with the blocks after it, and the computed output served. The weights may have been written without "
                "torch (call model.layer_cache.weights_changed()), or a warm cache altered (see integrity_key in "
                "docs/reliability.md).",
                stacklevel=4,
            )
