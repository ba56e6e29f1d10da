"""The segment strategy's own config fields (torch-free: the command line's ``inspect`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import StrategyConfig, check_number

SELECTIONS = ("deviation", "first")


@dataclass
class SegmentConfig(StrategyConfig):
    """``strategy="segment"``: position-independent reuse of passages in causal decoders (docs/segment.md)."""

    reads = ("shared_store", "shared_store_kwargs")

    segment_separator: str | list[int] | None = None
    """What marks passage boundaries in a prompt: a string (tokenized, without special tokens, by the tokenizer
    saved with the model) or its token ids. Each run of tokens between separators is a segment, stored under its own
    tokens and reused at any position; the separator's own tokens are always computed. Required."""

    segment_recompute: float = 0.15
    """Share of the reused tokens recomputed so the prompt sees its passages' interaction, 0.0 to 1.0. At 1.0 the
    prompt is a full prefill (segments are only stored). 0.15: on SmolLM2-135M RAG prompts of 4-8 news passages it
    kept the first token of a full prefill on every prompt measured and lowered the last position's KL from about
    0.055 (nothing recomputed) to about 0.04 (docs/benchmarks.md); models larger than 135M are not measured."""

    segment_selection: str = "first"
    """Which reused tokens are recomputed: ``"first"`` (EPIC: each segment's first tokens; no probe) or
    ``"deviation"`` (CacheBlend: those whose key/value states at the probe layer deviate most from the prompt's
    own; one pass of the first layers over the whole prompt chooses them). On SmolLM2-135M ``"first"`` was both
    faster and closer to a full prefill in every run (docs/benchmarks.md), hence the default."""

    segment_probe_layer: int = 1
    """The early layer at which ``"deviation"`` compares reused with fresh states (layers up to it are computed for
    the whole prompt, and their states are exact). 0 would see no interaction: a token's layer-0 states depend on
    itself alone."""

    def __post_init__(self) -> None:
        separator = self.segment_separator
        ids = isinstance(separator, list | tuple) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in separator
        )
        if separator is not None and not (isinstance(separator, str) and separator) and not (ids and separator):
            raise ValueError(
                f"segment_separator must be a non-empty string or a non-empty list of token ids, got {separator!r}."
            )
        if isinstance(separator, tuple):
            self.segment_separator = list(separator)
        check_number("segment_recompute", self.segment_recompute, 0.0, 1.0)
        if self.segment_selection not in SELECTIONS:
            raise ValueError(f"segment_selection must be one of {SELECTIONS}, got {self.segment_selection!r}.")
        check_number("segment_probe_layer", self.segment_probe_layer, 0, None, integer=True, what="an int >= 0")

    def check_with(self, config: Any) -> None:
        if config.strategy == "segment" and self.segment_separator is None:
            raise ValueError(
                "strategy='segment' needs segment_separator: the string (or token ids) that separates the passages "
                "of a prompt, e.g. segment_separator=' # # '."
            )
