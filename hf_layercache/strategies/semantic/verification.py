"""Verification: judging verified hits against what the layer computed, by cosine at once or, with
``acceptance="argmax"``, by the model's prediction once its output is known."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...bank import CacheBank
from ...config import LayerCacheConfig
from ...events import Verdict
from ...verified import ErrorBound
from .alignment import on_device, take
from .entries import SemanticEntry
from .run import Candidate, SemanticRun
from .search import SIMILARITY_TOLERANCE

RecordVerdict = Callable[[Verdict, CacheBank | None, str], None]
"""``StrategyContext.record_verdict``: what verifying an entry found, for the bank's policy and the layer's stats."""


class Verifier:
    """Judges verified rows and records the verdicts: in the stats and the policy (``record_verdict``) and, with
    ``max_error_rate``, in the entry that would have served and in the layer's pooled observations (``error_bound``).

    It reads ``config.acceptance`` and ``acceptance_cosine`` at every call. ``model_name`` only names the model when
    ``acceptance="argmax"`` finds no logits to judge.
    """

    def __init__(
        self,
        banks: dict[str, CacheBank],
        config: LayerCacheConfig,
        error_bound: ErrorBound | None,
        record_verdict: RecordVerdict,
        model_name: str,
    ):
        self.banks = banks
        """The strategy's banks by layer name, filled as it attaches."""
        self.config = config
        self.error_bound = error_bound
        self.record_verdict = record_verdict
        self.model_name = model_name

    def check(
        self, run: SemanticRun, verified: dict[int, Candidate], hidden: torch.Tensor, computed: torch.Tensor
    ) -> None:
        """Judge the verified hits against what the layer computed: the relative error goes to the policy, the
        ``acceptance`` verdict (now for ``"cosine"``, once the output is known for ``"argmax"``) to :meth:`_judge`."""
        for row, candidate in verified.items():
            pos = on_device(run.positions[row], hidden.device)
            value = candidate.entry.value.to(device=hidden.device, dtype=torch.float32)
            value = take(value, candidate.index)
            approx = hidden[row, pos].float() + value if candidate.entry.kind == "delta" else value
            exact = computed[row, pos].float()
            if candidate.computed is not None:  # a partial hit computes some tokens: judged on what it serves
                kept = torch.ones(exact.shape[0], dtype=torch.bool, device=exact.device)
                kept[candidate.computed.to(exact.device)] = False
                approx, exact = approx[kept], exact[kept]
            approx, exact = approx.flatten(), exact.flatten()
            error = float((approx - exact).norm() / exact.norm().clamp_min(1e-12))
            if self.config.acceptance == "argmax":
                run.pending.append((row, candidate, error))
                continue
            cosine = float(torch.nn.functional.cosine_similarity(approx, exact, dim=0))
            self._judge(candidate, error, cosine >= self.config.acceptance_cosine - SIMILARITY_TOLERANCE)

    def _judge(self, candidate: Candidate, error: float, acceptable: bool) -> None:
        """Record a verdict in the stats and, with ``max_error_rate``, in the entry that would have served, or in the
        entry of the same input that has replaced it since (it took over the observations)."""
        verdict = Verdict(candidate.entry_id, error, acceptable, explored=candidate.explore)
        self.record_verdict(verdict, self.banks[candidate.bank], candidate.bank)
        if self.error_bound is None:
            return
        bank, bound = self.banks[candidate.bank], self.error_bound
        entry_id = bank.find(candidate.entry.source)

        def observe(entry: SemanticEntry | None) -> None:
            bound.observe(
                candidate.bank, entry.observations if entry is not None else None, candidate.score, acceptable
            )

        if entry_id is None or not bank.update(entry_id, observe):
            observe(None)  # the entry is gone: the layer still learns from the verdict

    # --- acceptance="argmax" --------------------------------------------------------------------------------------
    def judge_predictions(self, run: SemanticRun, output: Any) -> None:
        """Judge each verified row: acceptable when its computed prediction is the one its candidate's request got
        (what serving the candidate's state would have answered). Then record the prediction of every computed row
        in its entries, for the requests they will serve."""
        predictions = self._predictions(run, output)
        for row, candidate, error in run.pending:
            served = int(candidate.entry.prediction) if candidate.entry.prediction is not None else -1
            if served >= 0 and predictions[row] is not None:  # otherwise unknown, and nothing is learnt
                self._judge(candidate, error, predictions[row] == served)
        for row, prediction in enumerate(predictions):
            if not run.exact[row] or prediction is None:
                continue
            for bank in self.banks.values():
                entry_id = bank.find(run.digests[row])
                if entry_id is not None:
                    bank.update(entry_id, lambda entry, p=prediction: _record_prediction(entry, p))

    def _predictions(self, run: SemanticRun, output: Any) -> list[int | None]:
        """Each row's prediction: the argmax of its logits, for per-token logits at its last real token (they may
        cover only the last positions, as ``generate`` asks with ``logits_to_keep``); ``None`` where not covered."""
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise ValueError(
                "acceptance='argmax' judges the prediction of the model's task head, output.logits, but "
                f"{self.model_name} returned none. Load the model with a head "
                "(AutoModelForSequenceClassification, AutoModelForCausalLM, ...) and keep return_dict=True, or use "
                "acceptance='cosine'."
            )
        if logits.dim() not in (2, 3) or logits.shape[0] != run.batch:
            return [None] * run.batch
        if logits.dim() == 2:
            return logits.argmax(-1).tolist()
        offset = run.mask.shape[1] - logits.shape[1]
        out: list[int | None] = []
        for row, pos in enumerate(run.positions):
            last = (pos.stop - 1 if isinstance(pos, slice) else int(pos[-1])) if run.lengths[row] else -1
            column = last - offset
            out.append(int(logits[row, column].argmax()) if last >= 0 and 0 <= column < logits.shape[1] else None)
        return out


def _record_prediction(entry: SemanticEntry, prediction: int) -> None:
    if entry.prediction is not None:
        entry.prediction.fill_(prediction)
