"""The attention strategy's own config fields (torch-free: the command line's ``inspect`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import StrategyConfig, check_number


@dataclass
class AttentionConfig(StrategyConfig):
    """``strategy="attention"``: attention-map reuse in prefill, AttnCache (docs/attention.md)."""

    reads = ("backend", "backend_kwargs", "threshold")

    attention_key_dim: int = 64
    """Dimensions of the attention strategy's per-layer lookup key (1 to 128). The key is a random projection of
    the layer's query and key states pooled over position segments; more dimensions separate inputs better but cost
    more per lookup."""

    attention_key_segments: int = 16
    """Position segments the attention strategy's key pools over (1 to 256): with 1 the key is a bag of states and
    ignores order; more segments tell apart inputs whose content sits at other positions."""

    attention_position_tolerance: float = 0.1
    """Largest relative change ``|x - x_stored| / |x_stored|`` of a position's query (key) states for the attention
    strategy to reuse that row (column) of a stored map; rows and columns that changed more are computed fresh.
    ``0`` reuses only positions whose states are bit-identical (lossless). ``threshold`` preselects entries by the
    cosine of their pooled keys."""

    attention_verify_rows: int = 8
    """Query rows (evenly spaced, the last included) the attention strategy recomputes exactly for every candidate
    hit to check it, at ``rows / sequence length`` of the cost of a miss. ``0`` trusts the key similarity alone."""

    attention_max_error: float = 0.2
    """Largest total variation distance (0 to 1) allowed between a served map's verified rows and the exact ones,
    in any head; a candidate above it is a miss. Lower is stricter."""

    attention_gate_interval: int = 16
    """Calls between the attention strategy's gate probes. Per layer and length bucket, the gate measures what a
    hit, a miss and the model's default attention (sdpa) cost here, and the recent reuse rate; where caching is not
    expected to be faster, the layer runs the default attention with no bookkeeping and takes the cached path once
    every this many calls, to notice reusable traffic (up to 8 times as many after probes that found no reuse;
    while caching, it runs the default once per this many calls, to keep measuring it). ``0``: no gate, every
    prefill call takes the cached path."""

    def __post_init__(self) -> None:
        check_number("attention_key_dim", self.attention_key_dim, 1, 128, integer=True)
        check_number("attention_key_segments", self.attention_key_segments, 1, 256, integer=True)
        check_number(
            "attention_position_tolerance",
            self.attention_position_tolerance,
            0.0,
            float("inf"),
            what="a relative change >= 0",
            open_high=True,
        )
        check_number(
            "attention_verify_rows",
            self.attention_verify_rows,
            0,
            None,
            integer=True,
            what="a non-negative int (0: no verification)",
        )
        check_number(
            "attention_max_error", self.attention_max_error, 0.0, 1.0, what="a total variation distance in [0, 1]"
        )
        check_number(
            "attention_gate_interval",
            self.attention_gate_interval,
            0,
            None,
            integer=True,
            what="a non-negative int (0: no gate, always cache)",
        )
