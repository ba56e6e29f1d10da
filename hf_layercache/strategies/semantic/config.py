"""The semantic strategy's own config fields (torch-free: the command line's ``inspect`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...config import LayerCacheConfig, StrategyConfig, check_number
from ...registry import FINGERPRINTS

EDITS = ("additive", "any")
"""What a hit may span (``SemanticConfig.edits``): tokens added at the ends only, or any tokens changed."""
DEFAULT_FINGERPRINT = "minhash"
"""Token overlap: on real documents it never matched unrelated ones (docs/semantic.md)."""


@dataclass
class SemanticConfig(StrategyConfig):
    """``strategy="semantic"``: approximate layer reuse for similar inputs, LLMCache (docs/semantic.md)."""

    reads = ("backend", "backend_kwargs", "threshold", "verify_fraction")

    fingerprint: str | None = None
    """How inputs become key vectors for approximate strategies; ``None`` lets the strategy choose (``semantic``:
    ``"minhash"``, token overlap, which on real documents never matched unrelated ones; see docs/semantic.md)."""

    fingerprint_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the fingerprint class, e.g. ``{"dim": 128}`` or ``{"layers": 2}`` for ``probe``."""

    reuse: str = "state"
    """How the ``semantic`` strategy reuses a similar earlier input's layer: ``"state"`` (the LLMCache paper)
    replaces the state with the earlier input's and jumps to the deepest layer that hits, so the answer is the earlier
    input's; ``"residual"`` adds that input's layer update (output minus input) to the new input's own state, so the
    new input's information is kept. ``"state"`` is the default: faster at equal or better fidelity on the benchmark
    in docs/semantic.md, which compares them."""

    max_error_rate: float | None = None
    """Error-bounded semantic reuse (vCache): the largest probability, above 0 and below 1, that a served hit is
    unacceptable (see ``acceptance``). Each entry learns from verified requests how its similarity relates to
    acceptable reuse, and a hit is served only when the estimated probability of an unacceptable result stays under
    this rate; otherwise the request computes (and the answer teaches the entry). ``threshold`` then only preselects
    the candidates (the nearest entry at or above it), keeping the learned model to similarities where reuse can be
    right. ``None``: the static ``threshold`` alone decides."""

    acceptance: str = "cosine"
    """How a verified hit is judged acceptable, for ``max_error_rate`` and the observed error rate ``stats()``
    reports: ``"cosine"``, the state it would have served is close to the computed one (``acceptance_cosine``), or
    ``"argmax"``, the model's prediction (the argmax of ``output.logits``: a classifier's class, a causal LM's next
    token after the last real token) is the one the entry's own request got, which is what a state hit serves. It needs
    a model with a task head and ``reuse="state"``."""

    acceptance_cosine: float = 0.95
    """With ``acceptance="cosine"``, when a verified hit counts as acceptable: the cosine between the state it would
    have served and the computed one (the row's real tokens flattened together, at the layer where it is served) is
    at least this (-1 to 1)."""

    edits: str = "additive"
    """Which token edits a ``semantic`` hit may span. ``"additive"``: every token of the cached input is still there,
    in order, and the new ones sit at the ends only (a greeting put in front, a reference id appended); a changed,
    dropped or inserted word inside the text computes, as do equal-length edits (a number, a typo): one word can
    reverse a text's meaning, and a served row would carry the old one (one-word edits of 200 real short texts were
    served down to a cosine of 0.73 of their own embedding; docs/semantic.md). ``"any"``: changed tokens are served
    their counterparts' states too (equal lengths position to position, others by the diff), the behaviour before
    2026-12-07, for traffic where such edits are known not to matter."""

    max_unaligned: float = 0.08
    """Largest fraction (0 to 1) of a new input's tokens that may lack a counterpart in a cached entry of another
    length (token sequences are aligned by a diff); above it the entry is a miss. 0: lengths must match. Requests
    with a KV cache, and causal layers (decoders), always need every token's counterpart. A token without one is
    served an estimate (the mean of the entry's inner tokens, or with ``edits="any"`` a neighbour's state), so this
    bounds the invented share of a hit: 0.08 lets a greeting put in front of a 60-token text hit, while a reference
    id appended to a 70-token one (0.2 let it hit) moved its embedding below a cosine of 0.95 (docs/semantic.md)."""

    max_added: float = 0.25
    """Largest fraction (0 to 1) of a new input's tokens that a *partial* hit may add to the entry's: with
    ``edits="additive"``, a row that adds tokens at its ends to a cached entry's (a greeting, a reference id) takes
    the entry's states for the entry's tokens and computes only the added ones and the entry's tokens right next to
    them, in every layer, attending to the entry's other stored keys and values (CacheBlend's selective recompute).
    Its added tokens are computed, not invented, so ``max_unaligned`` does not bound them; this does. For the same
    reason ``threshold`` judges what such a row takes, not what it adds: with ``"minhash"``, the share of the entry's
    token pairs found in the row (a 60-token notice with 15 tokens appended shares 0.8 of the pairs of the two texts
    but holds all of the entry's). Needs layers that take a KV-cache argument with bidirectional eager or sdpa
    attention (BERT-like encoders) and no KV cache in the request; elsewhere such rows are served whole within
    ``max_unaligned`` or computed. Entries then also hold their keys and values in every looked-up layer (float16 for
    a float32 model: 6x the bytes of the state for a 6-layer model), recorded while rows find entries
    (docs/semantic.md). 0: no partial hits, and entries without K/V."""

    def __post_init__(self) -> None:
        if self.fingerprint is not None and (
            not isinstance(self.fingerprint, str) or self.fingerprint not in FINGERPRINTS
        ):
            raise ValueError(
                f"fingerprint={self.fingerprint!r} is not available; allowed: {', '.join(FINGERPRINTS.names())}."
            )
        if self.reuse not in ("residual", "state"):
            raise ValueError(f"reuse={self.reuse!r} is not allowed; use 'residual' or 'state'.")
        if self.edits not in EDITS:
            raise ValueError(f"edits={self.edits!r} is not allowed; use one of {', '.join(map(repr, EDITS))}.")
        check_number("max_unaligned", self.max_unaligned, 0.0, 1.0, what="a fraction in [0, 1]")
        check_number("max_added", self.max_added, 0.0, 1.0, what="a fraction in [0, 1]")
        if self.max_error_rate is not None:
            check_number(
                "max_error_rate",
                self.max_error_rate,
                0.0,
                1.0,
                open_low=True,
                open_high=True,
                what="a probability above 0 and below 1, or None",
            )
        if self.acceptance not in ("cosine", "argmax"):
            raise ValueError(f"acceptance={self.acceptance!r} is not allowed; use 'cosine' or 'argmax'.")
        check_number("acceptance_cosine", self.acceptance_cosine, -1.0, 1.0, what="a cosine similarity in [-1, 1]")
        kwargs = self.fingerprint_kwargs
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise ValueError(f"fingerprint_kwargs must be a dict with string keys, got {kwargs!r}.")
        if kwargs or self.fingerprint is not None:  # building one turns a misspelt kwarg into an error now
            name = self.fingerprint or DEFAULT_FINGERPRINT
            try:
                FINGERPRINTS.get(name)(**kwargs)
            except TypeError as err:
                raise ValueError(f"fingerprint_kwargs={kwargs!r} do not fit fingerprint {name!r}: {err}") from None

    def check_with(self, config: LayerCacheConfig) -> None:
        if self.max_error_rate is not None and config.strategy != "semantic":
            raise ValueError(
                f"max_error_rate applies to strategy='semantic' only; this config uses strategy={config.strategy!r}."
            )
        if self.acceptance == "argmax" and (config.strategy != "semantic" or self.reuse != "state"):
            raise ValueError(
                "acceptance='argmax' judges the prediction a state hit serves, so it needs strategy='semantic' with "
                f"reuse='state'; this config uses strategy={config.strategy!r}, reuse={self.reuse!r}."
            )
