"""Token alignment: which of an entry's token positions each of a row's tokens takes (``align_tokens``)."""

from __future__ import annotations

import difflib

import torch

Index = slice | torch.Tensor
"""Token positions: a slice when they are contiguous (a view, no copy), else an index tensor."""


def on_device(index: Index, device: torch.device) -> Index:
    return index.to(device) if isinstance(index, torch.Tensor) else index


def align_tokens(new: list[int], old: list[int], max_unaligned: float) -> Index | None:
    """For each position of ``new``, the position of ``old`` whose cached value it takes, or ``None``.

    Equal lengths map position to position (a typo or a swapped word keeps everything else in place), unless more
    than ``max_unaligned`` of the positions hold other tokens: then the content may have shifted (a word put in
    front, another dropped at the end), and the diff decides. Otherwise a diff over token ids maps equal runs one to
    one, replaced runs proportionally, and inserted tokens to the preceding old token; if more than
    ``max_unaligned`` of ``new`` has no counterpart, there is no alignment.
    """
    if len(new) == len(old):
        if max_unaligned <= 0 or sum(a != b for a, b in zip(new, old, strict=True)) <= max_unaligned * len(new):
            return slice(None)
    elif not old or not new or max_unaligned <= 0:
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
