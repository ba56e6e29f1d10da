"""Token alignment: which of an entry's token positions each of a row's tokens takes (``align_tokens``)."""

from __future__ import annotations

import difflib

import torch

Index = slice | torch.Tensor
"""Token positions: a slice when they are contiguous (a view, no copy), else an index tensor."""
ADDED = -1
"""In an ``edits="additive"`` index: a token added at the row's end, which the entry lacks (see :func:`take`)."""


def on_device(index: Index, device: torch.device) -> Index:
    return index.to(device) if isinstance(index, torch.Tensor) else index


def take(value: torch.Tensor, index: Index) -> torch.Tensor:
    """An entry's per-token ``value`` mapped onto a row by ``index``. A token added at the row's ends (:data:`ADDED`)
    takes the mean of the entry's inner tokens (its first and last, a ``[CLS]`` and ``[SEP]`` where there are such,
    left out): it leaves a mean-pooled embedding where the entry's content puts it. A neighbour's value instead
    weighted the pool towards that token (a ``[CLS]`` for a greeting): on campaign edits the rows served below
    cosine 0.95 of the truth went from 11 to 5 of 271 (docs/semantic.md)."""
    if isinstance(index, slice):
        return value[index]
    index = index.to(value.device)
    out = value[index.clamp_min(0)]
    added = index == ADDED
    if bool(added.any()):
        inner = value[1:-1] if value.shape[0] > 2 else value
        out[added] = inner.mean(0)
    return out


def align_tokens(new: list[int], old: list[int], max_unaligned: float, edits: str = "any") -> Index | None:
    """For each position of ``new``, the position of ``old`` whose cached value it takes, or ``None``.

    ``edits="additive"`` maps only a row that holds every token of ``old`` in order, with tokens of its own added
    at its ends alone (within one token of either end, where a ``[CLS]`` or ``[SEP]`` may stay outside them): a
    changed, dropped or inserted word inside a text moves its meaning, and a served row would carry the old
    meaning (one-word edits of short texts were served at a cosine of 0.73 to their own embedding), so such a row
    computes. ``edits="any"`` maps equal lengths position to position (a typo or a swapped word keeps everything
    else in place), unless more than ``max_unaligned`` of the positions hold other tokens: then the content may have
    shifted (a word put in front, another dropped at the end), and the diff decides. Either way a diff over token
    ids maps equal runs one to one, replaced runs proportionally (``"any"`` only), and added tokens to the
    preceding old token (``"any"``) or to :data:`ADDED` (``"additive"``, see :func:`take`); if more than
    ``max_unaligned`` of ``new`` has no counterpart, there is no alignment.
    """
    if new == old:
        return slice(None)
    if edits == "additive" and len(new) <= len(old):
        return None  # nothing added, so something changed or was dropped: no diff needed to say so
    if edits == "any" and len(new) == len(old):
        if max_unaligned <= 0 or sum(a != b for a, b in zip(new, old, strict=True)) <= max_unaligned * len(new):
            return slice(None)
    elif not old or not new or max_unaligned <= 0:
        return None
    index, unaligned = [0] * len(new), 0
    matcher = difflib.SequenceMatcher(None, new, old, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            index[i1:i2] = range(j1, j2)
            continue
        if edits == "additive" and not (tag == "delete" and (i1 <= 1 or i2 >= len(new) - 1)):
            return None  # a token of ``old`` changed or dropped, or one added inside the text
        if tag == "replace":
            index[i1:i2] = [j1 + (i - i1) * (j2 - j1) // (i2 - i1) for i in range(i1, i2)]
            unaligned += max(0, (i2 - i1) - (j2 - j1))
        elif tag == "delete":  # tokens of ``new`` that ``old`` lacks
            index[i1:i2] = [ADDED if edits == "additive" else max(j1 - 1, 0)] * (i2 - i1)
            unaligned += i2 - i1
    if unaligned > max_unaligned * len(new):
        return None
    return torch.tensor(index)


def with_neighbours(added: torch.Tensor, length: int, reach: int) -> torch.Tensor:
    """The positions of ``added`` tokens (sorted, among a row's ``length``) and of the tokens within ``reach`` of
    them: the ones whose states an addition moves most."""
    if reach <= 0 or added.numel() == 0:
        return added
    near = (added.unsqueeze(1) + torch.arange(-reach, reach + 1)).flatten()
    return torch.unique(near[(near >= 0) & (near < length)])
