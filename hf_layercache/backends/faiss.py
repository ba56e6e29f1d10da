"""Any FAISS index, chosen by an index factory string."""

from __future__ import annotations

import warnings
from typing import Any

import faiss
import numpy as np
import torch

from ..registry import register_backend
from ._store import IndexedBackend

# Without an ID selector, tombstones are skipped by asking for k + tombstones results; FAISS's GPU indexes cap k at
# 2048, so such indexes are rebuilt before tombstones pass this.
_MAX_OVERSAMPLE = 1024
_PARAMETERS = {"ef_search": "efSearch", "ef_construction": "efConstruction", "nprobe": "nprobe"}
_POINTS_PER_LIST = 39
"""Training points per inverted list FAISS's k-means asks for (it warns below it)."""
# HNSW's beam width when none is given. In benchmarks/lookup.py at 100k keys, FAISS's own default of 16 found the
# true best key for 89-93% of near-duplicate queries, 32 for 94-96%, 64 for 98% at about 5% more latency than 16.
DEFAULT_EF_SEARCH = 64


@register_backend("faiss")
class FaissBackend(IndexedBackend):
    """Any FAISS index, built from an index factory string: ``backend_kwargs={"index": "IVF1024,Flat", "nprobe": 8}``.

    Keys are L2-normalised and compared by inner product, i.e. cosine, and every candidate FAISS returns is rescored
    from the exact keys, so scores are true cosines even for compressed indexes (SQ, PQ).

    The backend numbers FAISS's items itself (item i is slot i of its key store), so every index type works,
    including those FAISS cannot delete from (HNSW): a removed key becomes a tombstone that searches skip, through an
    ``IDSelectorBitmap`` where the index honours one and otherwise by asking for extra results, and the index is
    rebuilt from the live keys once tombstones exceed ``rebuild_ratio`` of them. Indexes that need training (IVF, PQ)
    are searched exactly until ``train_size`` keys are present, then trained on that many of them; a rebuild retrains
    on the keys live at that time, which follows a drifting key distribution.

    On a CUDA device, with a GPU build of FAISS (``faiss-gpu-cu12``) and a visible GPU, the index is moved to that
    GPU; index types FAISS has no GPU version of (HNSW) stay on the CPU with a warning. Builds always run on the CPU.

    Args:
        index: a FAISS index factory string: "Flat" (exact), "HNSW32" (graph, no training), "IVF1024,Flat",
            "IVF1024,SQ8", "OPQ32,IVF1024,PQ32", ...
        ef_search: HNSW's beam width at search time; higher is slower and more accurate. Default
            ``DEFAULT_EF_SEARCH`` (64), chosen by benchmarks/lookup.py, instead of FAISS's 16. Recall falls as the
            index grows: raise it for millions of keys (or use IVF, as ``auto`` does).
        ef_construction: HNSW's beam width while inserting (FAISS default 40).
        nprobe: how many IVF lists a search visits (FAISS default 1).
        train_size: keys gathered, then sampled, to train an index that needs it. Default 39 * nlist for IVF
            (FAISS's minimum) and 10_000 for other trained indexes (enough for 8-bit PQ codebooks).
        rebuild_ratio: tombstones, as a fraction of the live keys, that trigger a rebuild.
        background: rebuild in a worker thread while the old index keeps answering (True), or inline.
    """

    def __init__(
        self,
        dim: int,
        metric: str = "cosine",
        device: torch.device | str = "cpu",
        index: str = "HNSW32",
        ef_search: int | None = None,
        ef_construction: int | None = None,
        nprobe: int | None = None,
        train_size: int | None = None,
        rebuild_ratio: float = 0.25,
        background: bool = True,
    ):
        super().__init__(dim, metric, device, background)
        if not rebuild_ratio > 0:
            raise ValueError(f"FaissBackend: rebuild_ratio must be > 0, got {rebuild_ratio!r}.")
        self.rebuild_ratio = rebuild_ratio
        self._given = _given(ef_search, ef_construction, nprobe)
        self._train_size_given = train_size
        self._configure(index)
        self._filtering = True
        self._gpu_resources: Any = None
        self._measured: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return self._store.nbytes + self._index_nbytes()

    def set_search_parameters(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change ``ef_search`` or ``nprobe`` on the live index and for later rebuilds, without rebuilding: the knob
        that trades recall for latency on a warm cache."""
        changes = _given(ef_search, None, nprobe)
        settings = {**self._settings, **changes}
        _new_index(self.dim, self.index_string, settings)  # raises ValueError where a setting does not apply
        # Replaced, not updated: a background build may be reading the old dict.
        self._settings, self._given = settings, {**self._given, **changes}
        if self._index is not None:
            _apply(self._index, changes, self.index_string)

    def rebuild(self, index: str | None = None) -> bool:
        """Start a rebuild from the live keys, optionally as another index type (a factory string), unless one is
        running; returns whether it started. ``auto`` uses it to keep an IVF's list count near sqrt(keys)."""
        self._collect()
        if self._pending is not None:
            return False
        if index is not None:
            self._configure(index)
        return super().rebuild()

    def _configure(self, index: str) -> None:
        """Validate factory string ``index`` with the kwargs given at construction, and adopt it for the next build."""
        settings = dict(self._given)
        if "ef_search" not in settings and _hnsw(_new_index(self.dim, index, {})) is not None:
            settings["ef_search"] = DEFAULT_EF_SEARCH
        template = _new_index(self.dim, index, settings)
        self.train_size = 0 if template.is_trained else _train_size(template, self._train_size_given)
        self.index_string, self._settings = index, settings

    def _build(self, keys: np.ndarray) -> Any:
        index = _new_index(self.dim, self.index_string, self._settings)
        if not index.is_trained:
            if len(keys) < self.train_size:
                return None
            sample = np.random.default_rng(0).choice(len(keys), self.train_size, replace=False)
            index.train(keys[np.sort(sample)])
        index.add(keys)
        return index

    def _extend(self, index: Any, keys: np.ndarray) -> bool:
        index.add(keys)
        return True

    def _candidates(self, index: Any, queries: np.ndarray, k: int) -> np.ndarray:
        if not self._filtering:
            return index.search(queries, min(k + self._store.n_dead, index.ntotal))[1]
        bits = self._store.live_bits
        selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)) if self._store.n_dead else None
        return index.search(queries, k, params=_search_parameters(index, selector, k))[1]

    def _rebuild_after(self) -> int:
        if self._index is None:
            return max(self.train_size - 1, 0)
        allowed = int(self.rebuild_ratio * len(self))
        return allowed if self._filtering else min(allowed, _MAX_OVERSAMPLE)

    def _swap(self, index: Any, snapshot: torch.Tensor, n_then: int) -> None:
        if index is not None:
            _apply(index, self._settings, self.index_string)  # set_search_parameters may have run during the build
            index = self._to_gpu(index) if self.device.type == "cuda" else index
            self._filtering = _accepts_selector(index)
        self._measured = None
        super()._swap(index, snapshot, n_then)

    def _to_gpu(self, index: Any) -> Any:
        if not hasattr(faiss, "index_cpu_to_gpu") or faiss.get_num_gpus() == 0:
            warnings.warn(
                f"FaissBackend: device is {self.device} but this FAISS build has no GPU support or sees no GPU; "
                "the index stays on the CPU (install faiss-gpu-cu12 for GPU search).",
                stacklevel=2,
            )
            return index
        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        gpu = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:
            return faiss.index_cpu_to_gpu(self._gpu_resources, gpu, index)
        except RuntimeError:
            warnings.warn(
                f"FaissBackend: FAISS has no GPU version of index {self.index_string!r}; it stays on the CPU.",
                stacklevel=2,
            )
            return index

    def _index_nbytes(self) -> int:
        """Serialised size of the index, re-measured when it has changed by over 10% since, else scaled."""
        if self._index is None:
            return 0
        n = self._index.ntotal
        if self._measured is None or abs(n - self._measured[0]) > 0.1 * self._measured[0]:
            cpu = faiss.index_gpu_to_cpu(self._index) if _on_gpu(self._index) else self._index
            self._measured = (n, int(faiss.serialize_index(cpu).nbytes))
        measured_n, measured = self._measured
        return measured * n // measured_n if measured_n else measured


def _given(ef_search: int | None, ef_construction: int | None, nprobe: int | None) -> dict[str, int]:
    given = {"ef_search": ef_search, "ef_construction": ef_construction, "nprobe": nprobe}
    for name, value in given.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"FaissBackend: {name} must be a positive int, got {value!r}.")
    return {name: value for name, value in given.items() if value is not None}


def _new_index(dim: int, index_string: str, settings: dict[str, int]) -> Any:
    """A fresh CPU index for ``index_string`` with ``settings`` applied; ValueError if either does not fit."""
    try:
        index = faiss.index_factory(dim, index_string, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(
            f"FaissBackend: index {index_string!r} is not a FAISS index factory string for inner-product search "
            f"({str(err).splitlines()[-1]}); examples: 'Flat', 'HNSW32', 'IVF1024,Flat', 'IVF1024,SQ8'."
        ) from None
    if isinstance(faiss.downcast_index(index), faiss.IndexIDMap):
        raise ValueError(f"FaissBackend: index {index_string!r}: drop 'IDMap', the backend maps ids itself.")
    if isinstance(faiss.downcast_index(index), (faiss.IndexNSG, faiss.IndexNNDescent)):
        raise ValueError(
            f"FaissBackend: index {index_string!r} builds its graph in one pass and takes no keys later; "
            "a cache adds keys all the time, use 'HNSW32' instead."
        )
    _apply(index, settings, index_string)
    return index


def _apply(index: Any, settings: dict[str, int], index_string: str) -> None:
    space = faiss.GpuParameterSpace() if _on_gpu(index) else faiss.ParameterSpace()
    for name, value in settings.items():
        try:
            space.set_index_parameter(index, _PARAMETERS[name], value)
        except RuntimeError:
            raise ValueError(f"FaissBackend: {name} does not apply to index {index_string!r}.") from None


def _train_size(template: Any, train_size: int | None) -> int:
    ivf = faiss.try_extract_index_ivf(template)
    if train_size is None:
        return _POINTS_PER_LIST * ivf.nlist if ivf is not None else 10_000
    least = _POINTS_PER_LIST * ivf.nlist if ivf is not None else 1
    if not isinstance(train_size, int) or isinstance(train_size, bool) or train_size < least:
        wanted = (
            f"at least {_POINTS_PER_LIST} * nlist = {least} (k-means with fewer points per list trains a poor index; "
            "FAISS warns)"
            if ivf is not None
            else "a positive int"
        )
        raise ValueError(f"FaissBackend: train_size must be {wanted}, got {train_size!r}.")
    return train_size


def _hnsw(index: Any) -> Any:
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index.hnsw if isinstance(index, faiss.IndexHNSW) else None


def _search_parameters(index: Any, selector: Any, k: int) -> Any:
    """Parameters carrying ``selector`` and the index's own settings, which FAISS would otherwise reset to defaults."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe, max_codes=ivf.max_codes)
    hnsw = _hnsw(index)
    if hnsw is not None:
        return faiss.SearchParametersHNSW(sel=selector, efSearch=max(hnsw.efSearch, k))
    return faiss.SearchParameters(sel=selector)


def _on_gpu(index: Any) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(faiss.downcast_index(index), faiss.GpuIndex)


def _accepts_selector(index: Any) -> bool:
    """Whether searches of ``index`` can skip tombstones through an ID selector (GPU indexes and some types cannot)."""
    if _on_gpu(index):
        return False
    bits = np.full(index.ntotal // 8 + 1, 255, dtype=np.uint8)  # selects all: an empty selection may scan the graph
    selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    try:
        index.search(np.zeros((1, index.d), dtype=np.float32), 1, params=_search_parameters(index, selector, 1))
    except RuntimeError:
        return False
    return True
