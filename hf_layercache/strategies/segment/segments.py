"""A prompt's segments: the runs of tokens between separators, and the digests they are stored under."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from ...bank_format import DIGEST_BYTES


@dataclass
class Segment:
    """A run of tokens between separators: ``[start, end)`` of the row's real tokens."""

    start: int
    end: int
    digest: bytes
    entry_id: int | None = None
    """The bank's entry of the same tokens, when it holds one (looked up)."""

    @property
    def length(self) -> int:
        return self.end - self.start


def split(tokens: torch.Tensor, separator: torch.Tensor, namespace: str) -> list[Segment]:
    """The segments of ``tokens`` (1-D), in order; separator tokens belong to none (they are always computed). A
    prompt without the separator is one segment."""
    n, width = len(tokens), len(separator)
    if width and n >= width:
        windows = tokens.unfold(0, width, 1)
        starts = (windows == separator).all(dim=1).nonzero().flatten().tolist()
    else:
        starts = []
    cuts, previous = [], -width
    for s in starts:
        if s >= previous + width:  # overlapping matches: the first wins
            cuts.append(s)
            previous = s
    root = _root(namespace)
    segments, begin = [], 0
    for cut in [*cuts, n]:
        if cut > begin:
            segments.append(Segment(begin, cut, _digest(root, tokens[begin:cut])))
        begin = cut + width
    return segments


def digest_of(tokens: torch.Tensor, namespace: str) -> bytes:
    """The key a segment of exactly ``tokens`` is stored under for ``namespace`` (what :func:`split` gives it)."""
    return _digest(_root(namespace), tokens)


def _root(namespace: str) -> bytes:
    label = json.dumps(["hf_layercache.segment", 1, namespace]).encode()
    return hashlib.blake2b(label, digest_size=DIGEST_BYTES).digest()


def _digest(root: bytes, tokens: torch.Tensor) -> bytes:
    """A segment's key: its tokens alone (with the tenant), whatever surrounds them."""
    h = hashlib.blake2b(root, digest_size=DIGEST_BYTES)
    h.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    return h.digest()
