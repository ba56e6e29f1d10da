"""Error-bounded reuse (vCache, arXiv 2502.03771, reimplemented from the paper): serve an approximate hit only when
the estimated probability that it is unacceptable stays under a user-set ``max_error_rate``.

A static similarity threshold is too strict for some entries and too loose for others. Instead, every entry keeps
*observations*: for requests whose nearest entry it was, the similarity ``s`` and whether serving it would have
been acceptable ``y`` (known because that request computed the real result). A logistic model
``P(y = 1 | s) = sigmoid(gamma * (s - t))`` is fitted, ``t`` being a threshold, over a grid of ``(t, gamma)`` so
that its uncertainty is kept; from it comes ``alpha``, a bound on the probability that serving at ``s`` is
unacceptable. The request then *explores* (computes, records ``(s, y)``, serves the fresh result) with probability
``tau = 1 - delta / alpha``, so that the chance of serving an unacceptable result, ``(1 - tau) * alpha``, is at most
``delta`` (and always when ``alpha`` exceeds ``MAX_SERVED_UNACCEPTABLE``).

vCache fits every entry on its own observations. Layer caches hold many entries that are rarely anyone's nearest
neighbour twice, so such a fit would almost never gather enough to serve (a bound under 1% needs hundreds of
acceptable observations of that one entry). Here the bound comes from the fit of the layer's recent observations
(all entries pooled), and an entry whose own record holds an unacceptable reuse also gets a fit of its own
observations, the larger of the two bounds deciding: an entry that served badly near ``s`` gets a stricter
threshold than its layer, and it regains the layer's only as its acceptable observations accumulate. With fewer
than ``MIN_OBSERVATIONS`` pooled observations a layer always explores.

Observations live in each entry as one int64 tensor (:data:`OBSERVATIONS`), so they are bounded with the entry,
counted in the budget, evicted with it and saved with the warm cache.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

OBSERVATIONS = "observations"
"""The entry field holding its observations: ``[count, packed_0, ..., packed_{CAPACITY-1}]`` (a ring)."""
CAPACITY = 64
"""Observations an entry keeps (the most recent): 520 bytes per entry."""
POOLED_CAPACITY = 4096
"""Recent observations per layer that make its pooled fit."""
MAX_SERVED_UNACCEPTABLE = 0.5
"""A hit more likely unacceptable than not is never served. vCache would still serve it with probability
``delta / alpha``, spending the error budget on it; a cache that knows a hit is probably wrong should miss."""
MIN_OBSERVATIONS = 20
"""Pooled observations a layer needs before it serves anything."""
_ENTRY_FITS = 256
"""Entry fits kept between decisions (an entry's fit changes only when it gains an observation)."""
_SCALE = 1 << 20
"""Fixed-point scale of a packed similarity (about 1e-6 resolution)."""


# --- observations stored in an entry ---------------------------------------------------------------------------------
def new_observations() -> torch.Tensor:
    return torch.zeros(CAPACITY + 1, dtype=torch.long)


def add_observation(observations: torch.Tensor, similarity: float, acceptable: bool) -> None:
    """Record one ``(similarity, acceptable)`` in place (the oldest is overwritten once ``CAPACITY`` are held)."""
    count = int(observations[0])
    fixed = round((min(max(similarity, -1.0), 1.0) + 1.0) * _SCALE)
    observations[1 + count % CAPACITY] = fixed * 2 + int(acceptable)
    observations[0] = count + 1


def read_observations(observations: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities, acceptable)`` as float arrays, oldest order not kept (the fit does not need it)."""
    held = min(int(observations[0]), CAPACITY)
    packed = observations[1 : 1 + held].cpu().numpy()
    return (packed // 2) / _SCALE - 1.0, (packed % 2).astype(np.float64)


def check_observations(observations: torch.Tensor) -> None:
    """Refuse an observation tensor from disk that :func:`read_observations` could misread."""
    if observations.dtype != torch.long or tuple(observations.shape) != (CAPACITY + 1,):
        raise ValueError(f"'{OBSERVATIONS}' must be an int64 tensor of shape ({CAPACITY + 1},).")
    if (
        int(observations[0]) < 0
        or bool((observations[1:] < 0).any())
        or bool((observations[1:] > 4 * _SCALE + 1).any())
    ):
        raise ValueError(f"'{OBSERVATIONS}' holds values outside the packed range.")


# --- the logistic model ----------------------------------------------------------------------------------------------
THRESHOLDS = np.linspace(0.2, 1.02, 206)
"""Grid of the threshold ``t`` (similarity at which reuse is acceptable half the time)."""
SLOPES = np.geomspace(3.0, 1000.0, 64)
"""Grid of the slope ``gamma`` (how sharply acceptability rises around ``t``)."""
_T, _G = np.meshgrid(THRESHOLDS, SLOPES, indexing="ij")


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return np.minimum(z, 0.0) - np.log1p(np.exp(-np.abs(z)))


def log_likelihood(similarities: np.ndarray, acceptable: np.ndarray) -> np.ndarray:
    """Log-likelihood of the observations at every grid point of ``P(acceptable | s) = sigmoid(gamma (s - t))``;
    similarities are rounded to 0.001 and equal ones counted once with their multiplicity (fast for thousands)."""
    fixed = np.round(similarities * 1e3).astype(np.int64) * 2 + acceptable.astype(np.int64)
    values, counts = np.unique(fixed, return_counts=True)
    s, y = (values // 2) / 1e3, (values % 2).astype(bool)
    z = _G[..., None] * (s - _T[..., None])
    return (counts * np.where(y, _log_sigmoid(z), _log_sigmoid(-z))).sum(-1)


_LEVELS = np.geomspace(1e-3, 0.3, 16)
"""Confidence levels ``eps`` tried: with probability ``eps`` the bound is wrong (and serving then counts as wrong)."""
_DROPS = torch.special.ndtri(torch.as_tensor(1.0 - _LEVELS, dtype=torch.float64)).numpy() ** 2 / 2
"""Log-likelihood drop that keeps a model inside the one-sided ``1 - eps`` likelihood-ratio region (chi2, 1 dof)."""


@dataclass(frozen=True)
class Fit:
    """The log-likelihood of observations over the grid of ``(t, gamma)``: the fitted threshold and slope together
    with their uncertainty (every model the data do not rule out)."""

    log_likelihood: np.ndarray

    @classmethod
    def of(cls, similarities: np.ndarray, acceptable: np.ndarray) -> Fit:
        return cls(log_likelihood(similarities, acceptable))

    def unacceptable_probability(self, similarity: float) -> float:
        """``alpha``: the least, over confidence levels ``eps``, of ``eps + (1 - eps) * upper_eps``, where
        ``upper_eps`` is the largest error rate at ``s`` of any model inside the ``1 - eps`` likelihood-ratio region.
        A profile-likelihood bound rather than a Gaussian (Laplace) one: it stays honest when every observation
        was acceptable (perfect separation), where it behaves like the rule of three (about ``1.35 / n``)."""
        gap, order = self._ranked
        wrong = np.exp(_log_sigmoid(-_G.ravel()[order] * (similarity - _T.ravel()[order])))
        upper = np.maximum.accumulate(wrong)[np.searchsorted(gap, _DROPS, side="right") - 1]
        return float(np.min(_LEVELS + (1.0 - _LEVELS) * upper))

    @cached_property
    def _ranked(self) -> tuple[np.ndarray, np.ndarray]:
        """Grid points from the most likely down: (log-likelihood gaps to the best, sorted; their order)."""
        gap = (self.log_likelihood.max() - self.log_likelihood).ravel()
        order = np.argsort(gap, kind="stable")
        return gap[order], order

    @property
    def threshold(self) -> float:
        """The most likely threshold ``t`` (for reports)."""
        return float(_T.flat[int(self.log_likelihood.argmax())])


# --- the decision ----------------------------------------------------------------------------------------------------
class ErrorBound:
    """Exploration probabilities and observations for every bank of one strategy; thread-safe."""

    def __init__(self, max_error_rate: float):
        self.delta = max_error_rate
        self._pooled: dict[str, deque[tuple[float, bool]]] = {}
        self._seen: dict[str, int] = {}
        """Observations recorded per bank since it started (the layer fit is refreshed from this count)."""
        self._log_likelihood: dict[str, np.ndarray] = {}
        """Per bank, the log-likelihood of its pooled observations over the grid, kept as a running sum (each
        observation adds its term, and the one it pushes out of the pool takes its term back), so refreshing the
        layer fit never refits thousands of observations."""
        self._fits: dict[str, tuple[int, Fit]] = {}
        self._entry_fits: dict[tuple[str, int, int], Fit | None] = {}
        """Recent entries' own fits, keyed by their observation count (a fit changes only with a new observation)."""
        self._lock = threading.Lock()

    def exploration_probability(
        self, bank: str, entry_id: int, observations: torch.Tensor | None, similarity: float
    ) -> float:
        """``tau`` for serving an entry with its ``observations`` at ``similarity``: 1 (always compute) while the
        layer knows too little."""
        alpha = self.unacceptable_probability(bank, entry_id, observations, similarity)
        if alpha is None or alpha > MAX_SERVED_UNACCEPTABLE:
            return 1.0
        return max(1.0 - self.delta / alpha, 0.0) if alpha > 0 else 0.0

    def unacceptable_probability(
        self, bank: str, entry_id: int, observations: torch.Tensor | None, similarity: float
    ) -> float | None:
        """``alpha`` for an entry at ``similarity``, or ``None`` while the layer has too few observations."""
        fit = self._layer_fit(bank)
        if fit is None:
            return None
        alpha = fit.unacceptable_probability(similarity)
        own = self._entry_fit(bank, entry_id, observations)
        return alpha if own is None else max(alpha, own.unacceptable_probability(similarity))

    def _entry_fit(self, bank: str, entry_id: int, observations: torch.Tensor | None) -> Fit | None:
        """The entry's own fit, only once its own record holds an unacceptable reuse (else it is the layer's)."""
        if observations is None or int(observations[0]) == 0:
            return None
        key = (bank, entry_id, int(observations[0]))
        with self._lock:
            if key in self._entry_fits:
                return self._entry_fits[key]
        s, y = read_observations(observations)
        own = Fit.of(s, y) if (y == 0).any() else None
        with self._lock:
            self._entry_fits[key] = own
            while len(self._entry_fits) > _ENTRY_FITS:
                self._entry_fits.pop(next(iter(self._entry_fits)))
        return own

    def observe(self, bank: str, observations: torch.Tensor | None, similarity: float, acceptable: bool) -> None:
        """Pool a verdict for the layer and record it in the entry's ``observations`` (updated in place; the caller
        holds the bank's lock, see ``CacheBank.update``), if it keeps any."""
        with self._lock:
            if observations is not None:
                add_observation(observations, similarity, acceptable)
            pooled = self._pooled.setdefault(bank, deque(maxlen=POOLED_CAPACITY))
            total = self._log_likelihood.setdefault(bank, np.zeros(_T.shape))
            if len(pooled) == pooled.maxlen:
                total -= _term(*pooled[0])
            pooled.append((similarity, acceptable))
            total += _term(similarity, acceptable)
            self._seen[bank] = self._seen.get(bank, 0) + 1

    def rebuild(self, bank: str, observations: list[torch.Tensor]) -> None:
        """Pooled observations from the entries' own, after a warm cache was loaded or the bank cleared."""
        pooled: deque[tuple[float, bool]] = deque(maxlen=POOLED_CAPACITY)
        for recorded in observations:
            if recorded is not None:
                s, y = read_observations(recorded)
                pooled.extend(zip(s.tolist(), (y > 0).tolist(), strict=True))
        with self._lock:
            self._pooled[bank] = pooled
            self._log_likelihood[bank] = _pooled_log_likelihood(pooled)
            self._fits.pop(bank, None)
            self._entry_fits.clear()
            self._seen[bank] = len(pooled)

    def _layer_fit(self, bank: str) -> Fit | None:
        """The fit over the layer's pooled observations, refreshed whenever it has gained some (cheap: the
        log-likelihood is kept up to date by :meth:`observe`)."""
        with self._lock:
            pooled, seen = self._pooled.get(bank), self._seen.get(bank, 0)
            if pooled is None or len(pooled) < MIN_OBSERVATIONS:
                return None
            cached = self._fits.get(bank)
            if cached is not None and cached[0] == seen:
                return cached[1]
            fit = Fit(self._log_likelihood[bank].copy())
            self._fits[bank] = (seen, fit)
        return fit


def _term(similarity: float, acceptable: bool) -> np.ndarray:
    """One observation's log-likelihood over the grid, its similarity rounded as :func:`log_likelihood` does."""
    return log_likelihood(np.array([similarity]), np.array([float(acceptable)]))


def _pooled_log_likelihood(pooled: deque[tuple[float, bool]]) -> np.ndarray:
    if not pooled:
        return np.zeros(_T.shape)
    s, y = (np.array(column, dtype=np.float64) for column in zip(*pooled, strict=True))
    return log_likelihood(s, y)
