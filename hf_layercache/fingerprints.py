"""Fingerprints: an input (or a layer's input) turned into one small key vector per row, for similarity lookup.

Contract: ``fingerprint(input_ids, attention_mask, embeddings) -> keys`` of shape ``(batch, dim)``, compared by
cosine similarity in a bank's backend. ``embeddings`` are the hidden states the key is taken from: the input
embeddings in front of the first cached layer, or a layer's own input when the semantic strategy keys every layer
on what that layer sees. ``input_ids`` may be ``None`` (a request made with ``inputs_embeds``); fingerprints that
need token ids then raise, and the strategy misses.

Every random quantity comes from a ``torch.Generator`` seeded with ``seed`` on the CPU, never from Python's salted
``hash()``, so two processes (or a process and the warm cache it loads) compute identical keys. Keys stay small (a
few hundred dimensions): a flattened hidden state as key would cost more to search than the layer it could skip.
"""

from __future__ import annotations

import math

import torch

from .registry import register_fingerprint

_PRIME = (1 << 31) - 1  # Mersenne prime for universal hashing; products of two values below it fit in int64
_MIX = 0x9E3779B1  # Knuth's multiplicative constant, to spread hash values before taking one bit
_CHUNK_ELEMENTS = 1 << 22
"""MinHash hashes this many (row, window, permutation) values at a time: 32 MB of int64, whatever the batch."""


def _check_positive(owner: str, name: str, value: object, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high):
        allowed = f"a positive int{f' up to {high}' if high is not None else ''}"
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}.")
    return value


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens of each row (``attention_mask`` 1), so padding never moves a key."""
    if attention_mask is None:
        return states.float().mean(dim=1)
    mask = attention_mask.to(device=states.device, dtype=torch.float32).unsqueeze(-1)
    return (states.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def gaussian_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A (rows, cols) standard normal matrix, the same in every process for the same seed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, cols, generator=generator)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A non-linear 31-bit integer hash (Mueller's), so that near token ids (10, 11, 12) do not hash to near values,
    which a linear hash alone would turn into correlated minima."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0x7FFFFFFF
    return x ^ (x >> 16)


class Fingerprint:
    """Base class: subclasses implement ``__call__`` and ``key_dim``."""

    after_layers: int = 0
    """How many cached layers must run before the key can be taken (0: from the input embeddings)."""
    uses_embeddings: bool = True
    """False when the key depends on the token ids alone: one key then serves every layer of a request."""

    def confirm(self, new: list[int], old: list[int]) -> float | None:
        """The exact similarity the key estimates, from the two rows' token ids, or ``None`` when the key is the
        similarity itself. The strategy serves an entry only when this too reaches the threshold, so an estimate's
        noise never decides a hit."""
        return None

    def contained(self, new: list[int], old: list[int]) -> float | None:
        """The share of ``old``'s content that ``new`` holds, from the token ids, or ``None`` when the key cannot
        say. A partial hit is judged by it: the row computes what it adds, so what it takes from the entry is what
        must be similar, not the whole row."""
        return None

    def containment_floor(self, threshold: float, growth: float) -> float:
        """The lowest key similarity at which a row up to ``growth`` times an entry's length may still hold
        ``threshold`` of the entry (:meth:`contained`): entries below it are not worth confirming."""
        return threshold

    def __call__(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, embeddings: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def key_dim(self, hidden_size: int) -> int:
        """Length of the keys made from hidden states of ``hidden_size``."""
        raise NotImplementedError


class _Projected(Fingerprint):
    """Shared by the fingerprints that project a pooled hidden state: one cached projection per device."""

    def __init__(self, dim: int, seed: int):
        self.dim = _check_positive(type(self).__name__, "dim", dim, high=4096)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{type(self).__name__}: seed must be an int, got {seed!r}.")
        self.seed = seed
        self._projections: dict[tuple[int, torch.device], torch.Tensor] = {}

    def key_dim(self, hidden_size: int) -> int:
        return self.dim

    def _projection(self, hidden: int, device: torch.device) -> torch.Tensor:
        key = (hidden, device)
        if key not in self._projections:
            self._projections[key] = (gaussian_matrix(hidden, self.dim, self.seed) / math.sqrt(self.dim)).to(device)
        return self._projections[key]


@register_fingerprint("mean_embedding")
class MeanEmbedding(_Projected):
    """Mask-aware mean of the embeddings over real tokens (LLMCache's fingerprint).

    Hidden sizes above ``dim`` are reduced by a fixed Gaussian random projection, which keeps cosine similarities
    close (Johnson-Lindenstrauss) while keeping the search cheap; smaller hidden sizes are used as they are.
    """

    def __init__(self, dim: int = 256, seed: int = 0):
        super().__init__(dim, seed)

    def key_dim(self, hidden_size: int) -> int:
        return min(hidden_size, self.dim)

    def __call__(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, embeddings: torch.Tensor
    ) -> torch.Tensor:
        pooled = masked_mean(embeddings, attention_mask)
        if pooled.shape[-1] <= self.dim:
            return pooled
        return pooled @ self._projection(pooled.shape[-1], pooled.device)


@register_fingerprint("simhash")
class SimHash(_Projected):
    """Sign bits of ``bits`` random projections of the mean embedding (Charikar's SimHash), as a ±1 vector.

    The cosine of two keys is ``1 - 2 * hamming / bits``, which estimates ``1 - 2 * angle / pi`` of the embeddings:
    coarser than the mean embedding itself, but it is what a bit-packed index would store.
    """

    def __init__(self, bits: int = 256, seed: int = 0):
        super().__init__(bits, seed)

    def __call__(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, embeddings: torch.Tensor
    ) -> torch.Tensor:
        pooled = masked_mean(embeddings, attention_mask)
        signs = torch.sign(pooled @ self._projection(pooled.shape[-1], pooled.device))
        return torch.where(signs == 0, torch.ones_like(signs), signs)


@register_fingerprint("minhash")
class MinHash(Fingerprint):
    """MinHash over token shingles: the cosine of two keys estimates the Jaccard similarity of their shingle sets.

    Each of ``num_perm`` universal hash functions keeps its minimum over the row's shingles (runs of ``shingle``
    token ids; rows shorter than that use their tokens). Two rows agree on a slot with probability equal to their
    Jaccard similarity; a slot is then written as one pseudo-random sign of its minimum, so equal slots add +1 and
    unequal ones average 0, and the cosine of the keys is an unbiased Jaccard estimate (standard deviation about
    ``sqrt(J (1 - J) / num_perm)``: 0.02 at J = 0.85). :meth:`confirm` computes the exact Jaccard similarity from
    the token ids, which the strategy checks before serving. It sees tokens only, not meaning: a paraphrase with
    other words scores low, a reordering of the same words high, and one changed word in a sentence of n tokens
    costs about ``4 / n`` of it (two shingles lost, two gained).

    The semantic strategy's default: on real documents, unrelated texts share almost no token pairs (Jaccard under
    0.1), while resends with a changed number or an added greeting keep most of theirs (docs/semantic.md).
    """

    uses_embeddings = False

    def __init__(self, num_perm: int = 256, shingle: int = 2, seed: int = 0):
        self.num_perm = _check_positive("MinHash", "num_perm", num_perm, high=4096)
        self.shingle = _check_positive("MinHash", "shingle", shingle, high=16)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"MinHash: seed must be an int, got {seed!r}.")
        self.seed = seed
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self._a = torch.randint(1, _PRIME, (num_perm,), generator=generator, dtype=torch.long)
        self._b = torch.randint(0, _PRIME, (num_perm,), generator=generator, dtype=torch.long)

    def key_dim(self, hidden_size: int) -> int:
        return self.num_perm

    def __call__(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, embeddings: torch.Tensor
    ) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("MinHash needs input_ids; this request passed inputs_embeds.")
        ids = input_ids.to("cpu", torch.long)
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to("cpu").bool()
        lengths = mask.sum(1)
        if ids.shape[0] == 0:  # an empty batch: no keys (the model says what it makes of it)
            return torch.zeros(0, self.num_perm, device=embeddings.device)
        if bool((lengths < self.shingle).any()):  # a row shorter than a shingle keys its tokens themselves
            return torch.stack([self._row(row[m]) for row, m in zip(ids, mask, strict=True)]).to(embeddings.device)
        real_first = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # each row's real tokens, in order
        compact = ids.gather(1, real_first)
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // (compact.shape[1] * self.num_perm))
        keys = [
            self._rows(compact[i : i + rows_per_chunk], lengths[i : i + rows_per_chunk])
            for i in range(0, compact.shape[0], rows_per_chunk)
        ]
        return torch.cat(keys).to(embeddings.device)

    def confirm(self, new: list[int], old: list[int]) -> float:
        """The exact Jaccard similarity of the two rows' shingle sets."""
        a, b = self._shingles(new), self._shingles(old)
        return len(a & b) / len(a | b) if a or b else 1.0

    def contained(self, new: list[int], old: list[int]) -> float:
        """The share of ``old``'s shingles found in ``new``."""
        a, b = self._shingles(new), self._shingles(old)
        return len(a & b) / len(b) if b else 1.0

    def containment_floor(self, threshold: float, growth: float) -> float:
        """Jaccard is ``C |B| / (|A| + |B| - C |B|)`` for containment ``C`` of ``B`` in ``A``, lowest where ``A``
        is longest (``growth |B|``); three standard deviations of the estimate below that."""
        jaccard = threshold / (1.0 + growth - threshold)
        return jaccard - 3.0 * math.sqrt(jaccard * (1.0 - jaccard) / self.num_perm)

    def _shingles(self, tokens: list[int]) -> set[tuple[int, ...]]:
        n = min(self.shingle, max(1, len(tokens)))
        return set(zip(*(tokens[i:] for i in range(n)), strict=False))

    def _rows(self, compact: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """:meth:`_row` of several rows at once: ``compact`` holds each row's real tokens first (``lengths`` of them,
        at least a shingle each), the windows past them are left out of the minimum."""
        n = self.shingle
        windows = compact.unfold(1, n, 1) % _PRIME  # (rows, windows, n)
        shingles = torch.zeros(windows.shape[:2], dtype=torch.long)
        for i in range(n):  # polynomial hash of each window, kept below the prime
            shingles = (shingles * 1_000_003 + windows[..., i]) % _PRIME
        hashed = (_mix(shingles).unsqueeze(-1) * self._a + self._b) % _PRIME  # (rows, windows, num_perm)
        past_end = torch.arange(windows.shape[1]) >= (lengths - n + 1).unsqueeze(1)
        minimum = hashed.masked_fill_(past_end.unsqueeze(-1), _PRIME).min(dim=1).values
        bit = ((minimum * _MIX) >> 13) & 1
        return bit.float() * 2.0 - 1.0

    def _row(self, tokens: torch.Tensor) -> torch.Tensor:
        n = min(self.shingle, max(1, tokens.numel()))
        if tokens.numel() == 0:
            tokens = torch.zeros(1, dtype=torch.long)
        windows = tokens.unfold(0, n, 1) % _PRIME  # (shingles, n)
        shingles = torch.zeros(windows.shape[0], dtype=torch.long)
        for i in range(n):  # polynomial hash of each window, kept below the prime
            shingles = (shingles * 1_000_003 + windows[:, i]) % _PRIME
        hashed = (_mix(shingles).unsqueeze(1) * self._a + self._b) % _PRIME  # (shingles, num_perm)
        minimum = hashed.min(dim=0).values
        bit = ((minimum * _MIX) >> 13) & 1
        return bit.float() * 2.0 - 1.0


@register_fingerprint("probe")
class Probe(MeanEmbedding):
    """The hidden state after the first ``layers`` cached layers, mean-pooled and projected like ``mean_embedding``.

    Those layers always compute; the key then reflects context the raw embeddings do not have (word order, which
    sense of a word), as First Block Cache keys on its first block's output. The strategy reads ``after_layers``.
    """

    def __init__(self, layers: int = 1, dim: int = 256, seed: int = 0):
        super().__init__(dim, seed)
        self.after_layers = _check_positive("Probe", "layers", layers)
