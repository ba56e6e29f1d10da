"""``semantic``: approximate reuse of layer work for inputs similar to earlier ones (LLMCache).

Every cached layer has a bank of entries from earlier inputs, found by cosine similarity of a fingerprint key; an
entry is served when the similarity reaches the layer's threshold (``config.threshold_for``). Two forms of reuse:

* ``reuse="residual"``: each layer is keyed on its *own input* (the fingerprint of the hidden state that
  enters it) and an entry holds the layer's update ``out - in`` of an earlier input. A hit adds that update to the
  new input's own state, ``h_l(x) ~= h_{l-1}(x) + [h_l(x') - h_{l-1}(x')]``, as diffusers' First Block Cache does, so
  the new input's information flows on and hit rates genuinely differ by depth.
* ``reuse="state"`` (the paper; the default, as it measured faster at equal or better fidelity): one fingerprint
  per request, from the state entering the first looked-up layer; entries hold an earlier input's layer *output*.
  Serving it throws the new input away, so a row jumps to the deepest layer that hits: the layers before it pass
  the row through, that layer returns the stored state, and the layers after it compute from there (on the earlier
  input's trajectory).

Rules that keep it honest (docs/semantic.md has the measurements):

* Tokens: an entry of another length is used only when the token sequences align (a diff over token ids) with at
  most ``max_unaligned`` of the new tokens lacking a counterpart; requests with a KV cache need equal lengths. A
  threshold of 1.0 or more serves identical token sequences only.
* Only exactly computed rows are stored: a row that was served an approximation never becomes an entry, so errors
  do not feed on themselves. Entries carry their namespace and are never served to another one.
* ``verify_fraction`` of hits are checked by computing the layer anyway: the relative error goes to the policy
  (``on_error``) and to ``stats()`` with the ``acceptance`` verdict, and the computed result is served. With
  ``acceptance="argmax"`` the verdict waits for the model's output: entries record the prediction their request got
  (``PREDICTION``), and a verified row is acceptable when its computed prediction is the same.
* ``max_error_rate`` adds a learned, error-bounded decision (:mod:`hf_layercache.verified`): the nearest entry at
  or above the threshold is a candidate, and it is served, or explored (computed and judged, its verdict recorded in
  the entry), as that module's bound says.
* Decoders: reuse happens in prefill only. The K/V a layer writes are recorded with its entry and replayed on a hit,
  so ``generate()`` continues from a consistent cache; with a KV cache a batch is served whole or computed whole,
  and decode steps (a non-empty cache) never look up.
* Layers that return more than their hidden state (T5's position biases) are refused: a hit could not produce them.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..fingerprints import Fingerprint
from ..kv import KVWrite, find_cache, past_length, record_kv_writes, replay_kv_writes
from ..layers import CachedLayer, rows_splittable, select_rows
from ..registry import get_fingerprint, register_strategy
from ..request import RequestScope, namespace_tag
from ..verified import OBSERVATIONS, ErrorBound, check_observations, new_observations
from .base import LayerHook, Strategy

_REQUEST = "semantic.request"
_CANDIDATES = 4
"""Nearest entries examined per row: the best may belong to another namespace or fail to align."""
_TOLERANCE = 1e-6
"""Float slack on similarity comparisons, so an identical input still hits at threshold 1.0."""
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


Index = slice | torch.Tensor
"""Token positions: a slice when they are contiguous (a view, no copy), else an index tensor."""


def on_device(index: Index, device: torch.device) -> Index:
    return index.to(device) if isinstance(index, torch.Tensor) else index


def align_tokens(new: list[int], old: list[int], max_unaligned: float) -> Index | None:
    """For each position of ``new``, the position of ``old`` whose cached value it takes, or ``None``.

    Equal lengths map position to position (a typo or a swapped word keeps everything else in place). Otherwise a
    diff over token ids maps equal runs one to one, replaced runs proportionally, and inserted tokens to the
    preceding old token; if more than ``max_unaligned`` of ``new`` has no counterpart, there is no alignment.
    """
    if len(new) == len(old):
        return slice(None)
    if not old or not new or max_unaligned <= 0:
        return None
    index, unaligned = [0] * len(new), 0
    matcher = difflib.SequenceMatcher(None, new, old, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            index[i1:i2] = range(j1, j2)
        elif tag == "replace":
            index[i1:i2] = [j1 + (i - i1) * (j2 - j1) // (i2 - i1) for i in range(i1, i2)]
            unaligned += max(0, (i2 - i1) - (j2 - j1))
        elif tag == "delete":  # tokens of ``new`` that ``old`` lacks
            index[i1:i2] = [max(j1 - 1, 0)] * (i2 - i1)
            unaligned += i2 - i1
    if unaligned > max_unaligned * len(new):
        return None
    return torch.tensor(index)


@dataclass
class Candidate:
    """An entry chosen for one row: its id, values and how its tokens map onto the row's."""

    entry_id: int
    bank: str
    values: dict[str, torch.Tensor]
    index: Index
    score: float
    explore: bool = False
    """``max_error_rate`` could not vouch for it: computed, judged, and the verdict recorded."""
    audit: bool = False
    """Drawn by ``verify_fraction``: computed and judged, although it would have been served."""

    @property
    def verify(self) -> bool:
        """Whether the row computes this layer instead of being served."""
        return self.explore or self.audit


@dataclass
class Target:
    """State reuse: the deepest layer (stack position) a row jumps to, and the entry served there."""

    position: int
    candidate: Candidate


@dataclass
class SemanticRun:
    """What one forward pass knows about one layer stack."""

    tokens: list[list[int] | None]
    """Real token ids of each row (``None`` for rows given as embeddings)."""
    positions: list[Index]
    """Where each row's real tokens sit in the padded batch."""
    lengths: list[int]
    digests: list[bytes]
    """Per row: namespace, stack and tokens, so identical inputs share one entry."""
    input_ids: torch.Tensor | None
    mask: torch.Tensor
    key_mask: torch.Tensor | None
    """The mask fingerprints see: ``None`` when every token is real (a cheaper plain mean)."""
    namespace: int
    with_kv: bool
    exact: list[bool]
    """Rows whose state so far was computed, not served: only they become entries."""
    keys: torch.Tensor | None = None
    entry_fields: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per row, the tensors every entry made from it shares (tokens, meta), built once per request."""
    targets: dict[int, Target] = field(default_factory=dict)
    pending: list[tuple[int, Candidate, float]] = field(default_factory=list)
    """``acceptance="argmax"``: verified rows, their candidates and relative errors, judged once the model's output
    is known."""
    alignments: dict[tuple[int, bytes], torch.Tensor | None] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.tokens)


def _positions(real: torch.Tensor) -> Index:
    """Where a row's real tokens are: a slice for the usual right or left padding, else their indices."""
    where = real.nonzero().squeeze(1)
    if where.numel() and int(where[-1] - where[0]) + 1 == where.numel():
        return slice(int(where[0]), int(where[-1]) + 1)
    return where


class SemanticLayerHook(LayerHook):
    def __init__(self, strategy: SemanticStrategy, layer: CachedLayer, position: int, rank: int):
        super().__init__(strategy, layer, position)
        self.rank = rank
        """Index among all cached layers (for ``threshold_for``)."""

    def forward_run(self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor) -> Any:
        if self.position < self.strategy.fingerprint.after_layers:  # the probe's layers always compute
            return self.pack(self.compute(run, arguments, hidden, list(range(run.batch)))[0])
        if self.strategy.reuse == "residual":
            out = self.strategy.residual_step(self, run, arguments, hidden)
        else:
            out = self.strategy.state_step(self, run, arguments, hidden)
        return self.pack(out)

    def compute(
        self, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor, rows: list[int]
    ) -> tuple[torch.Tensor, list[KVWrite]]:
        """Run the layer on ``rows`` (a sub-batch unless that is all of them); return the full-batch hidden state,
        with the input kept in the other rows, and the K/V writes it made."""
        start = time.perf_counter()
        if len(rows) == run.batch:
            with record_kv_writes(find_cache(arguments) if run.with_kv else None) as writes:
                out = self.original(**arguments)
        else:
            selected = torch.tensor(rows, device=hidden.device)
            out, writes = self.original(**select_rows(arguments, self.layer.spec, selected, run.batch)), []
        seconds = time.perf_counter() - start
        self.observe(out)
        computed = out[0] if isinstance(out, tuple) else out
        self.strategy.controller.stats_.record(self.layer.name, misses=len(rows), compute_seconds=seconds)
        if len(rows) == run.batch:
            return computed, writes
        full = hidden.clone()
        full[torch.tensor(rows, device=hidden.device)] = computed.to(full.dtype)
        return full, writes


@register_strategy("semantic")
class SemanticStrategy(Strategy):
    """Approximate layer reuse for similar inputs; see the module docstring and docs/semantic.md."""

    def __init__(self, controller):
        super().__init__(controller)
        self.reuse = self.config.reuse
        self.fingerprint: Fingerprint = get_fingerprint(self.config.fingerprint or "mean_embedding")(
            **self.config.fingerprint_kwargs
        )
        # Residual hits leave each layer's output the state the rest of the model computed from, as honest as the
        # final output; state hits pass rows through layers unchanged, so their per-layer states would misreport.
        self.intermediate_states_exact = self.reuse == "residual"
        self._draws = torch.Generator().manual_seed(0)
        self._hooks: list[SemanticLayerHook] = []
        rate = self.config.max_error_rate
        self.error_bound = ErrorBound(rate) if rate is not None else None

    # --- wiring ---------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        self._check_layers()
        key_dim = self.fingerprint.key_dim(self._hidden_size())
        stacks: dict[str, int] = {}
        for rank, layer in enumerate(self.layers):
            position = stacks.get(layer.stack, 0)
            stacks[layer.stack] = position + 1
            self.new_bank(layer.name, layer.device, n_banks=len(self.layers), key_dim=key_dim)
            hook = SemanticLayerHook(self, layer, position, rank)
            self._hooks.append(hook)
            self.hooks.replace_forward(layer.module, hook)
        self._jump_targets = self._find_jump_targets()

    def _find_jump_targets(self) -> set[str]:
        """State reuse: the layers a row can jump to. A row takes the deepest layer with a usable entry and every
        such layer holds the same inputs under the same key, so a shallower layer only catches rows all deeper ones
        missed when its threshold is lower than theirs: with one threshold, the last layer alone. Only these layers
        store and search entries, unless a KV cache needs the K/V of every layer a row skips."""
        targets = set()
        for stack in {hook.layer.stack for hook in self._hooks}:
            lowest_deeper = float("inf")
            for hook in reversed(self._stack_hooks(stack)):
                threshold = self.config.threshold_for(hook.rank)
                if hook.position >= self.fingerprint.after_layers and threshold < lowest_deeper:
                    targets.add(hook.layer.name)
                lowest_deeper = min(lowest_deeper, threshold)
        return targets

    def detach(self) -> None:
        self._hooks.clear()

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

    def banks_replaced(self) -> None:
        if self.error_bound is not None:
            for name, bank in self.banks.items():
                self.error_bound.rebuild(name, [values for _, values in bank.items()])

    def _check_layers(self) -> None:
        for layer in self.layers:
            if layer.spec.outputs > 1:
                raise ValueError(
                    f"strategy='semantic' serves layers that return their hidden state alone; {layer.name} "
                    f"({type(layer.module).__name__}) also returns position biases. Use strategy='exact'."
                )
        stacks = sorted({layer.stack for layer in self.layers})
        if self.config.acceptance == "argmax" and len(stacks) > 1:
            raise ValueError(
                f"acceptance='argmax' judges a prediction made from one layer stack, but this model caches {stacks}; "
                "use acceptance='cosine', or cache one stack with layers=."
            )
        threshold = self.config.threshold
        if isinstance(threshold, list) and len(threshold) != len(self.layers):
            raise ValueError(
                f"threshold has {len(threshold)} values but {len(self.layers)} layers are cached; give one per layer."
            )

    def _hidden_size(self) -> int:
        config = getattr(self.controller.model, "config", None)
        text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        size = getattr(text, "hidden_size", None)
        if not isinstance(size, int):
            raise ValueError("strategy='semantic' needs the model's hidden size (config.hidden_size) to size its keys.")
        return size

    def _stack_hooks(self, stack: str) -> list[SemanticLayerHook]:
        return [hook for hook in self._hooks if hook.layer.stack == stack]

    # --- per request ----------------------------------------------------------------------------------------------
    def begin_request(self, scope: RequestScope, arguments: dict[str, Any]) -> None:
        scope.state[_REQUEST] = (arguments.get("input_ids"), arguments.get("attention_mask"))

    def start_run(
        self, scope: RequestScope, layer: CachedLayer, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> SemanticRun | None:
        """What this call knows about its rows; ``None`` when it cannot use the cache (a decode step, shapes that
        do not fit, a token fingerprint without token ids)."""
        input_ids, mask = scope.state.get(_REQUEST, (None, None))
        cache = find_cache(arguments)
        if hidden.dim() != 3 or past_length(cache) > 0:
            return None
        batch, length = hidden.shape[:2]
        if input_ids is not None and tuple(input_ids.shape) != (batch, length):
            return None
        if input_ids is None and not self.fingerprint.uses_embeddings:
            return None
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
            return None
        real = mask.bool().cpu()
        positions = [_positions(row) for row in real]
        tokens: list[list[int] | None] = [None] * batch
        if input_ids is not None:
            tokens = [ids[r].tolist() for ids, r in zip(input_ids.cpu(), real, strict=True)]
        run = SemanticRun(
            tokens=tokens,
            positions=positions,
            lengths=[int(row.sum()) for row in real],
            digests=[self._digest(scope.namespace, t, hidden.shape[-1]) for t in tokens],
            input_ids=input_ids,
            mask=mask,
            key_mask=None if bool(real.all()) else mask,
            namespace=namespace_tag(scope.namespace),
            with_kv=cache is not None and arguments.get("use_cache", True) is not False,
            exact=[True] * batch,
        )
        if not self.fingerprint.uses_embeddings:
            run.keys = self.fingerprint(input_ids, run.key_mask, hidden).float()
        return run

    @staticmethod
    def _digest(namespace: str, tokens: list[int] | None, hidden_size: int) -> bytes:
        h = hashlib.blake2b(f"{namespace}:{hidden_size}".encode(), digest_size=32)
        # rows given as embeddings have no identity to share with other requests
        h.update(os.urandom(16) if tokens is None else torch.tensor(tokens, dtype=torch.long).numpy().tobytes())
        return h.digest()

    def key(self, run: SemanticRun, hidden: torch.Tensor) -> torch.Tensor:
        if not self.fingerprint.uses_embeddings:
            return run.keys
        return self.fingerprint(run.input_ids, run.key_mask, hidden).float()

    # --- finding entries ------------------------------------------------------------------------------------------
    def find(
        self, hook: SemanticLayerHook, run: SemanticRun, keys: torch.Tensor, rows: list[int], stored: str
    ) -> tuple[dict[int, Candidate], dict[int, float]]:
        """The best usable entry of ``hook``'s bank for each of ``rows`` at or above its threshold, and each row's
        best similarity in the bank."""
        bank = self.banks[hook.layer.name]
        if not rows or len(bank) == 0:
            return {}, {}
        threshold = self.config.threshold_for(hook.rank)
        scores, ids = bank.search(keys[rows].to(bank.device), min(_CANDIDATES, len(bank)))
        found, best = {}, {}
        for row, row_scores, row_ids in zip(rows, scores.tolist(), ids.tolist(), strict=True):
            best[row] = row_scores[0]
            for score, entry_id in zip(row_scores, row_ids, strict=True):
                if entry_id < 0 or score < threshold - _TOLERANCE:
                    break
                values = bank.get(entry_id)
                index = self._usable(run, row, values, stored, threshold) if values is not None else None
                if index is not None:
                    found[row] = Candidate(entry_id, hook.layer.name, values, index, score)
                    break
        return found, best

    def _usable(
        self, run: SemanticRun, row: int, values: dict[str, torch.Tensor], stored: str, threshold: float
    ) -> torch.Tensor | None:
        """How the entry's tokens map onto the row's, or ``None`` when it must not be served to this row."""
        meta = values.get("meta")
        if meta is None or int(meta[_NAMESPACE]) != run.namespace or stored not in values:
            return None
        if run.with_kv and not bool(meta[_KV_RECORDED]):
            return None
        tokens, old = run.tokens[row], values["tokens"]
        if threshold >= 1.0 and (tokens is None or tokens != old.tolist()):
            return None  # threshold 1.0: identical inputs only
        if tokens is None or old.numel() == 0 or run.with_kv:  # nothing to align by, or K/V need equal lengths
            return slice(None) if values[stored].shape[0] == run.lengths[row] else None
        cache_key = (row, old.numpy().tobytes())
        if cache_key not in run.alignments:
            run.alignments[cache_key] = align_tokens(tokens, old.tolist(), self.config.max_unaligned)
        return run.alignments[cache_key]

    def _choose(
        self, hook: SemanticLayerHook, run: SemanticRun, arguments: dict[str, Any], candidates: dict[int, Candidate]
    ) -> dict[int, Candidate]:
        """Drop partial hits a KV cache or unsplittable arguments cannot take, and draw the rows to verify."""
        partial = 0 < len(candidates) < run.batch
        if partial and (run.with_kv or not rows_splittable(arguments, hook.layer.spec, run.batch)):
            return {}
        fraction = self.config.verify_fraction
        for candidate in candidates.values():
            if self.error_bound is not None:
                tau = self.error_bound.exploration_probability(
                    candidate.bank, candidate.entry_id, candidate.values, candidate.score
                )
                candidate.explore = self._draw() < tau
            candidate.audit = not candidate.explore and fraction > 0 and self._draw() < fraction
        if run.with_kv and any(c.verify for c in candidates.values()):
            for candidate in candidates.values():  # a KV cache computes the whole batch or none of it
                candidate.audit = not candidate.explore
        return candidates

    def _draw(self) -> float:
        return float(torch.rand(1, generator=self._draws))

    def _record_lookups(self, hook: SemanticLayerHook, run: SemanticRun, candidates: dict[int, Candidate]) -> None:
        bank = self.banks[hook.layer.name]
        for row in range(run.batch):
            if row in candidates:
                bank.record_hit(candidates[row].entry_id, candidates[row].score)
            else:
                bank.record_miss()

    def _check(
        self,
        hook: SemanticLayerHook,
        run: SemanticRun,
        verified: dict[int, Candidate],
        hidden: torch.Tensor,
        true: torch.Tensor,
        stored: str,
    ) -> None:
        """Judge the verified hits against what the layer computed: the relative error goes to the policy, the
        ``acceptance`` verdict (now for ``"cosine"``, once the output is known for ``"argmax"``) to :meth:`_judge`."""
        bank = self.banks[hook.layer.name]
        for row, candidate in verified.items():
            pos = on_device(run.positions[row], hidden.device)
            value = candidate.values[stored].to(device=hidden.device, dtype=torch.float32)
            value = value[on_device(candidate.index, value.device)]
            approx = (hidden[row, pos].float() + value if stored == "delta" else value).flatten()
            exact = true[row, pos].float().flatten()
            error = float((approx - exact).norm() / exact.norm().clamp_min(1e-12))
            bank.record_error(candidate.entry_id, error)
            if self.config.acceptance == "argmax":
                run.pending.append((row, candidate, error))
                continue
            cosine = float(torch.nn.functional.cosine_similarity(approx, exact, dim=0))
            self._judge(candidate, error, cosine >= self.config.acceptance_cosine - _TOLERANCE)

    def _judge(self, candidate: Candidate, error: float, acceptable: bool) -> None:
        """Record a verdict in the stats and, with ``max_error_rate``, in the entry that would have served, or in the
        entry of the same input that has replaced it since (it took over the observations)."""
        self.controller.stats_.record_error(candidate.bank, error, acceptable, explored=candidate.explore)
        if self.error_bound is not None:
            bank = self.banks[candidate.bank]
            entry_id = bank.find(source_digest(candidate.values))
            entry = bank.get(entry_id) if entry_id is not None else None
            self.error_bound.observe(candidate.bank, entry or {}, candidate.score, acceptable)

    # --- acceptance="argmax" --------------------------------------------------------------------------------------
    def forward_request(self, scope: RequestScope, original: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        output = original(**arguments)
        if self.config.acceptance == "argmax":
            for run in scope.state.values():
                if isinstance(run, SemanticRun):
                    self._judge_predictions(run, output)
        return output

    def _judge_predictions(self, run: SemanticRun, output: Any) -> None:
        """Judge each verified row: acceptable when its computed prediction is the one its candidate's request got
        (what serving the candidate's state would have answered). Then record the prediction of every computed row
        in its entries, for the requests they will serve."""
        predictions = self._predictions(run, output)
        for row, candidate, error in run.pending:
            served = int(candidate.values[PREDICTION]) if PREDICTION in candidate.values else -1
            if served >= 0 and predictions[row] is not None:  # otherwise unknown, and nothing is learnt
                self._judge(candidate, error, predictions[row] == served)
        for row, prediction in enumerate(predictions):
            if not run.exact[row] or prediction is None:
                continue
            for bank in self.banks.values():
                entry_id = bank.find(run.digests[row])
                entry = bank.get(entry_id) if entry_id is not None else None
                if entry is not None and PREDICTION in entry:
                    entry[PREDICTION].fill_(prediction)

    def _predictions(self, run: SemanticRun, output: Any) -> list[int | None]:
        """Each row's prediction: the argmax of its logits, for per-token logits at its last real token (they may
        cover only the last positions, as ``generate`` asks with ``logits_to_keep``); ``None`` where not covered."""
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise ValueError(
                "acceptance='argmax' judges the prediction of the model's task head, output.logits, but "
                f"{type(self.controller.model).__name__} returned none. Load the model with a head "
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

    # --- residual reuse -------------------------------------------------------------------------------------------
    def residual_step(
        self, hook: SemanticLayerHook, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> torch.Tensor:
        """Serve ``hidden + cached update`` to rows with a similar entry; compute (and store) the others."""
        keys = self.key(run, hidden)
        found, _ = self.find(hook, run, keys, list(range(run.batch)), "delta")
        candidates = self._choose(hook, run, arguments, found)
        self._record_lookups(hook, run, candidates)
        served = {r: c for r, c in candidates.items() if not c.verify}
        compute_rows = [r for r in range(run.batch) if r not in served]
        if compute_rows:
            out, writes = hook.compute(run, arguments, hidden, compute_rows)
            # judged before storing: a stored row replaces the entry of the same input, and takes its observations
            self._check(hook, run, {r: c for r, c in candidates.items() if c.verify}, hidden, out, "delta")
            self._store(hook, run, keys, out, hidden, compute_rows, writes, "delta")
        else:
            out = hidden.clone()
        for row, candidate in served.items():
            pos = on_device(run.positions[row], hidden.device)
            delta = candidate.values["delta"].to(device=hidden.device, dtype=hidden.dtype)
            out[row, pos] = hidden[row, pos] + delta[on_device(candidate.index, delta.device)]
            run.exact[row] = False
        if run.with_kv and served:  # all rows are served together (see _choose)
            entries = [served[r].values for r in range(run.batch)]
            replay_kv_writes(find_cache(arguments), self._batch_writes(run, entries))
        self.controller.stats_.record(hook.layer.name, hits=len(served))
        return out

    # --- state reuse ----------------------------------------------------------------------------------------------
    def state_step(
        self, hook: SemanticLayerHook, run: SemanticRun, arguments: dict[str, Any], hidden: torch.Tensor
    ) -> torch.Tensor:
        """Rows jump to the deepest layer with a similar entry: pass through until there, take its state there."""
        if hook.position == self.fingerprint.after_layers:
            run.keys = self.key(run, hidden)
            run.targets = self._targets(hook, run, arguments)
        live = {r: t for r, t in run.targets.items() if not t.candidate.verify}
        passing = [r for r, t in live.items() if t.position > hook.position]
        serving = {r: t.candidate for r, t in live.items() if t.position == hook.position}
        compute_rows = [r for r in range(run.batch) if r not in passing and r not in serving]
        if compute_rows:
            out, writes = hook.compute(run, arguments, hidden, compute_rows)
            verified = {r: t.candidate for r, t in run.targets.items() if t.candidate.verify}
            here = {r: c for r, c in verified.items() if run.targets[r].position == hook.position}
            self._check(hook, run, here, hidden, out, "state")  # before storing: see residual_step
            if run.with_kv or hook.layer.name in self._jump_targets:
                self._store(hook, run, run.keys, out, hidden, compute_rows, writes, "state")
        else:
            out = hidden.clone()
        for row, candidate in serving.items():
            pos = on_device(run.positions[row], hidden.device)
            state = candidate.values["state"].to(device=hidden.device, dtype=hidden.dtype)
            out[row, pos] = state[on_device(candidate.index, state.device)]
        for row in [*passing, *serving]:
            run.exact[row] = False
        if run.with_kv and not compute_rows:  # every row skips or is served here (see _targets)
            replay_kv_writes(find_cache(arguments), self._batch_writes(run, self._kv_sources(hook, run)))
        self.controller.stats_.record(hook.layer.name, hits=len(passing) + len(serving))
        return out

    def _targets(self, hook: SemanticLayerHook, run: SemanticRun, arguments: dict[str, Any]) -> dict[int, Target]:
        """For each row, the deepest cached layer of the stack with a usable entry (searched deepest first)."""
        targets: dict[int, Target] = {}
        searching = list(range(run.batch))
        deepest_first = [
            deeper
            for deeper in reversed(self._stack_hooks(hook.layer.stack)[hook.position :])
            if run.with_kv or deeper.layer.name in self._jump_targets
        ]
        for i, deeper in enumerate(deepest_first):
            found, best = self.find(deeper, run, run.keys, searching, "state")
            for row, candidate in found.items():
                targets[row] = Target(deeper.position, candidate)
                self.banks[deeper.layer.name].record_hit(candidate.entry_id, candidate.score)
            # Banks hold the same inputs under the same keys, so a row whose best similarity is below every
            # remaining threshold would miss there too: stop searching for it (at worst a miss, never a wrong hit).
            lowest = min((self.config.threshold_for(h.rank) for h in deepest_first[i + 1 :]), default=2.0)
            searching = [r for r in searching if r not in found and best.get(r, 1.0) >= lowest - _TOLERANCE]
            if not searching:
                break
        for _ in range(run.batch - len(targets)):
            self.banks[hook.layer.name].record_miss()
        uniform = len(targets) == run.batch and len({t.position for t in targets.values()}) == 1
        if targets and not uniform and (run.with_kv or not rows_splittable(arguments, hook.layer.spec, run.batch)):
            return {}
        if run.with_kv and targets and not self._kv_available(hook, targets):
            return {}
        chosen = self._choose(hook, run, arguments, {r: t.candidate for r, t in targets.items()})
        return {r: targets[r] for r in chosen}

    def _kv_available(self, hook: SemanticLayerHook, targets: dict[int, Target]) -> bool:
        """A row that skips layers must find their recorded K/V: its source's entry in each skipped bank."""
        for target in targets.values():
            source = source_digest(target.candidate.values)
            for skipped in self._stack_hooks(hook.layer.stack)[hook.position : target.position]:
                if self.banks[skipped.layer.name].find(source) is None:
                    return False
        return True

    def _kv_sources(self, hook: SemanticLayerHook, run: SemanticRun) -> list[dict[str, torch.Tensor]]:
        """The entries whose K/V this layer replays: each row's source entry in this layer's bank."""
        bank = self.banks[hook.layer.name]
        out = []
        for row in range(run.batch):
            target = run.targets[row]
            if target.position == hook.position:
                out.append(target.candidate.values)
                continue
            entry_id = bank.find(source_digest(target.candidate.values))
            values = bank.get(entry_id) if entry_id is not None else None
            if values is None:
                raise RuntimeError(
                    f"semantic: the K/V of {hook.layer.name} for a skipped row were evicted mid-request."
                )
            out.append(values)
        return out
