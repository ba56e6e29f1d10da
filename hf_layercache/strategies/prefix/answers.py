"""Conversation turns: the tokens a ``generate()`` call decodes are stored as prefix blocks when the call returns, so
the next turn of a chat, which sends the earlier prompt, the model's answer and a new message, reuses them all.

While ``generate()`` runs, an :class:`AnswerRecorder` (one per call, found through a context variable, so threads and
nested calls never mix) notes the prefill's rows, its KV cache and final hidden states, and then, for each decode
step on that cache, the token fed and the base model's final hidden state of it (the head reads the same tensor; it
is kept, not copied). The keys and values of the decoded tokens are in the cache itself. When the call returns,
every row's prompt and decoded tokens are cut into blocks as a prompt's are (the same hash chain, so a re-rendered
chat template that matches the tokens hits, and one that does not misses) and the blocks the bank lacks are stored
through :class:`~.store.BlockStore`: budget, tenants, warm caches and the shared tier as for prompt blocks.

The last token ``generate()`` returns was never fed, so it has no states: a row's blocks end before it, and at the
first end-of-sequence token it fed (what follows are pads). Anything the recorder cannot vouch for stores nothing:
a second prefill in one call (chunked prefill, assisted decoding), a decode step of more than one token, a cache
changed between steps (beam search reorders it, assisted decoding crops it: the layers' tensors are then new
objects), beam search itself, or a prefill that was audited or ran whole.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ...kv import find_cache
from ...request import namespace_tag
from .block import PrefixBlock
from .chain import chain_root, chain_step
from .run import Row
from .store import BlockStore

_RECORDER: contextvars.ContextVar[AnswerRecorder | None] = contextvars.ContextVar("prefix_answers", default=None)

OnBaseOutput = Callable[[Any], Any]


@dataclass
class _Prefill:
    rows: list[Row]
    cache: Any
    hidden: torch.Tensor
    """(batch, width, hidden) final hidden states of the prompt, caller's layout."""
    root: bytes
    namespace: int
    seconds_per_token: float


class AnswerRecorder:
    """What one ``generate()`` call computed: its prefill, then the token and final hidden state of each step."""

    def __init__(self) -> None:
        self.prefill: _Prefill | None = None
        self.tokens: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        self.valid = True
        self._last_keys: torch.Tensor | None = None

    def record_prefill(
        self,
        rows: list[Row],
        arguments: dict[str, Any],
        hidden: torch.Tensor,
        namespace: str,
        block_size: int,
        seconds_per_token: float,
    ) -> None:
        """The call's prompt; a second one (chunked prefill, assisted decoding) makes the call store nothing."""
        cache = find_cache(arguments)
        if self.prefill is not None or cache is None or not getattr(cache, "layers", None):
            self.valid = False
            return
        root = chain_root(namespace, block_size)
        self.prefill = _Prefill(rows, cache, hidden, root, namespace_tag(namespace), seconds_per_token)
        self._last_keys = cache.layers[0].keys

    def follows(self, arguments: dict[str, Any]) -> bool:
        """Whether this call continues the recorded prefill's cache (a decode step of this ``generate()``)."""
        return self.prefill is not None and find_cache(arguments) is self.prefill.cache

    def step(self, arguments: dict[str, Any], call: Callable[[OnBaseOutput], Any]) -> Any:
        """A decode step, run by ``call(on_base_output)``; its token and final hidden state are noted when it is one
        token per row on the cache exactly as the previous call left it."""
        ids, cache = arguments.get("input_ids"), self.prefill.cache
        batch = self.prefill.hidden.shape[0]
        if not (
            self.valid
            and isinstance(ids, torch.Tensor)
            and tuple(ids.shape) == (batch, 1)
            and cache.layers[0].keys is self._last_keys
        ):
            self.valid = False
            return call(lambda output: None)
        captured: list[torch.Tensor] = []
        output = call(lambda base_output: captured.append(base_output[0]))
        if not captured or tuple(captured[0].shape[:2]) != (batch, 1):
            self.valid = False
            return output
        self.tokens.append(ids.detach().cpu())
        self.hidden.append(captured[0].detach())
        self._last_keys = cache.layers[0].keys
        return output

    def store(self, store: BlockStore, block_size: int, eos: set[int]) -> None:
        """Every row's blocks that hold decoded tokens and that the bank lacks, chain tails first."""
        prefill = self.prefill
        if not self.valid or prefill is None or not self.tokens:
            return
        cache, width = prefill.cache, prefill.hidden.shape[1]
        if cache.layers[0].keys is not self._last_keys or cache.get_seq_length() != width + len(self.tokens):
            return  # the cache changed after the last step: its states are not the ones recorded
        decoded, hidden = torch.cat(self.tokens, dim=1), torch.cat(self.hidden, dim=1)
        blocks = []
        for r, row in enumerate(prefill.rows):
            if row.tokens is not None and row.length:
                blocks += self._row_blocks(store, r, row, decoded[r], hidden[r], block_size, eos)
        starts: dict[int, int] = {}
        for r, start, *_ in blocks:  # a row's blocks in order: its first comes first
            starts.setdefault(r, prefill.rows[r].first + start)
        with store.gathering(cache.layers, starts) as states:
            for r, start, end, tokens, parent, digest, hidden_states in reversed(blocks):
                column = prefill.rows[r].first + start
                key, value = states.block(r, column, column + end - start)
                entry = PrefixBlock(key=key, value=value, hidden=hidden_states, tokens=tokens, parent=parent)
                store.put(entry, digest, prefill.namespace, prefill.seconds_per_token * (end - start))
        store.sweep()

    def _row_blocks(
        self,
        store: BlockStore,
        r: int,
        row: Row,
        decoded: torch.Tensor,
        hidden: torch.Tensor,
        block_size: int,
        eos: set[int],
    ) -> list[tuple]:
        """The row's new blocks from the first that holds a decoded token: ``(row, start, end, tokens, parent,
        digest, hidden)``, positions counted in the row's real tokens."""
        prefill = self.prefill
        fed = _until_end(decoded, eos)
        tokens = torch.cat([row.tokens, decoded[:fed]])
        states = torch.cat([prefill.hidden[r, row.first :], hidden[:fed].to(prefill.hidden.device)])
        parent, out = prefill.root, []
        for start in range(0, len(tokens), block_size):
            end = min(start + block_size, len(tokens))
            digest = chain_step(parent, tokens[start:end])
            if end > row.length and store.bank.find(digest) is None:
                out.append((r, start, end, tokens[start:end].clone(), parent, digest, states[start:end]))
            parent = digest
        return out


def _until_end(decoded: torch.Tensor, eos: set[int]) -> int:
    """How many decoded tokens to store: up to and including the first end-of-sequence token (pads follow it)."""
    for i, token in enumerate(decoded.tolist()):
        if token in eos:
            return i + 1
    return len(decoded)


def current() -> AnswerRecorder | None:
    """The recorder of the ``generate()`` call running in this context, if any."""
    return _RECORDER.get()


def recording_generate(
    generate: Callable[..., Any], on_return: Callable[[AnswerRecorder, dict[str, Any]], None]
) -> Callable[..., Any]:
    """``generate`` with a recorder for the call, handed to ``on_return`` with the call's keyword arguments once it
    returns (a nested call records in the outer one's recorder)."""

    @functools.wraps(generate)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        if _RECORDER.get() is not None:
            return generate(*args, **kwargs)
        recorder = AnswerRecorder()
        token = _RECORDER.set(recorder)
        try:
            output = generate(*args, **kwargs)
        finally:
            _RECORDER.reset(token)
        on_return(recorder, kwargs)
        return output

    return recorded


def generation_settings(model: Any, kwargs: dict[str, Any]) -> tuple[int, set[int]]:
    """``num_beams`` and the end-of-sequence token ids a ``generate(**kwargs)`` call used."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    return int(beams), set(_ids(eos))


def _ids(value: Any) -> Iterable[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
