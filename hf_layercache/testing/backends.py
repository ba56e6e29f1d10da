"""Conformance checks for lookup backends: what every registered backend must do, runnable on your own.

Each check is a plain function ``check_*(backend_cls, **backend_kwargs)`` that builds fresh backends as
``backend_cls(dim, metric="cosine", device="cpu", **backend_kwargs)``, raises ``AssertionError`` saying what was
expected when the backend falls short, and returns nothing. :func:`check_backend` runs them all. From a pytest file::

    import pytest
    from hf_layercache.testing.backends import CHECKS

    @pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
    def test_my_backend(check):
        check(MyBackend, my_option=3)

The data are easy on purpose (random unit vectors in 64 dimensions are nearly orthogonal, and queries are noisy
copies of stored keys, as a cache sees), so an approximate index is expected to agree with brute force exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from ..backends.base import Backend

DIM = 64
N_KEYS = 512


def check_empty_index(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """An empty index has length 0 and answers every query with ids -1 and scores -inf, also after emptying."""
    backend = _make(backend_cls, backend_kwargs)
    assert len(backend) == 0, f"a new backend has len {len(backend)}, expected 0"
    _expect_nothing(backend, "a new backend")
    backend.remove(torch.tensor([1, 2]))
    keys = _unit(_rng(1), 5)
    backend.add(torch.arange(5), keys)
    backend.remove(torch.arange(5))
    assert len(backend) == 0, f"after removing every key len is {len(backend)}, expected 0"
    _expect_nothing(backend, "a backend whose keys were all removed")


def check_top1_matches_brute_force(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """On well-separated keys the best match of each near-duplicate query is the brute-force one, with its cosine."""
    backend, ids, keys = _filled(backend_cls, backend_kwargs)
    queries = _near_duplicates(_rng(2), keys[::4])
    scores, found = backend.search(queries, 1)
    expected_scores, expected = _brute_force(queries, ids, keys, 1)
    wrong = (found[:, 0].cpu() != expected[:, 0]).sum().item()
    assert wrong == 0, f"top-1 differs from brute force for {wrong} of {len(queries)} queries"
    _assert_close(scores[:, 0], expected_scores[:, 0], "top-1 scores vs brute-force cosines")


def check_k_larger_than_index(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """With k above len, every key comes back once, best first, and the remaining slots are -1 / -inf."""
    backend = _make(backend_cls, backend_kwargs)
    keys = _unit(_rng(3), 3)
    ids = torch.tensor([10, 20, 30])
    backend.add(ids, keys)
    query = keys[1:2] + 0.3 * keys[2:3]
    scores, found = backend.search(query, 5)
    assert tuple(found.shape) == (1, 5) and tuple(scores.shape) == (1, 5), f"shapes {found.shape}, expected (1, 5)"
    _, expected = _brute_force(query, ids, keys, 3)
    assert found[0, :3].tolist() == expected[0].tolist(), f"ids {found[0].tolist()}, expected {expected[0].tolist()}"
    assert found[0, 3:].tolist() == [-1, -1], f"ids past the index are {found[0, 3:].tolist()}, expected -1"
    assert torch.isneginf(scores[0, 3:]).all(), f"scores past the index are {scores[0, 3:].tolist()}, expected -inf"


def check_batched_queries(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """A batch of queries gets the best match each query gets alone, and k distinct ids per row, best first."""
    backend, _, keys = _filled(backend_cls, backend_kwargs)
    queries = _near_duplicates(_rng(4), keys[:16])
    scores, found = backend.search(queries, 3)
    assert tuple(found.shape) == (16, 3), f"batched search returned shape {tuple(found.shape)}, expected (16, 3)"
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "batched scores are not sorted best first"
    for row, query in enumerate(queries):
        alone_scores, alone = backend.search(query[None], 3)
        assert found[row, 0] == alone[0, 0], f"query {row}: best id {found[row, 0]} in a batch, {alone[0, 0]} alone"
        _assert_close(scores[row, :1], alone_scores[0, :1], f"query {row}: batched vs single best score")
        assert len(set(found[row].tolist())) == 3, f"query {row}: repeated ids {found[row].tolist()}"


def check_removal_honoured(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """Removed ids never come back, the next best key takes their place, and unknown ids are ignored."""
    backend, ids, keys = _filled(backend_cls, backend_kwargs)
    twins = _near_duplicates(_rng(5), keys[:32])
    twin_ids = torch.arange(32) + 10**6
    backend.add(twin_ids, twins)
    gone = torch.cat([ids[:32], ids[64::2]])
    backend.remove(gone)
    backend.remove(torch.tensor([10**9, int(gone[0])]))
    expected_len = len(ids) + len(twin_ids) - len(gone)
    assert len(backend) == expected_len, f"len {len(backend)} after removal, expected {expected_len}"
    _, found = backend.search(keys[:32], 5)
    returned_gone = torch.isin(found.cpu(), gone)
    assert not returned_gone.any(), f"removed ids returned: {found.cpu()[returned_gone].unique().tolist()[:10]}"
    assert found[:, 0].cpu().tolist() == twin_ids.tolist(), "a removed key's near-duplicate is not its replacement"
    _, found = backend.search(_near_duplicates(_rng(13), keys[33:64]), 1)
    assert found[:, 0].cpu().tolist() == ids[33:64].tolist(), "kept keys are no longer found after removals"


def check_readd_replaces(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """Adding an id again replaces its key instead of storing a second one."""
    backend, ids, keys = _filled(backend_cls, backend_kwargs)
    new_key = _unit(_rng(6), 1)
    backend.add(ids[:1], new_key)
    assert len(backend) == len(ids), f"re-adding an id changed len to {len(backend)}, expected {len(ids)}"
    scores, found = backend.search(torch.cat([new_key, keys[:1]]), 1)
    assert found[0, 0] == ids[0] and scores[0, 0] > 0.999, "the re-added id is not found under its new key"
    assert found[1, 0] != ids[0], "the re-added id is still found under its old key"


def check_scores_are_cosines(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """Scores are cosines in [-1, 1] whatever the input norms, including negative ones, sorted best first."""
    backend = _make(backend_cls, backend_kwargs)
    base = _unit(_rng(7), 2)
    keys = torch.cat([base, -base]) * torch.tensor([[3.0], [0.2], [7.0], [1.0]])
    ids = torch.tensor([1, 2, 3, 4])
    backend.add(ids, keys)
    queries = torch.cat([5 * base[:1], _unit(_rng(8), 3)])
    scores, found = backend.search(queries, 4)
    expected_scores, _ = _brute_force(queries, ids, keys, 4)
    assert (scores >= -1).all() and (scores <= 1).all(), f"scores outside [-1, 1]: {scores.tolist()}"
    _assert_close(scores, expected_scores, "scores vs brute-force cosines")
    assert (scores[:, :-1] >= scores[:, 1:]).all(), f"scores are not sorted best first: {scores.tolist()}"
    assert found[0, 0] == 1 and found[0, -1] == 3, f"expected id 1 first and its opposite id 3 last: {found[0]}"


def check_persistence_round_trip(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """``state_dict`` holds tensors only, survives safetensors, and restores the same answers into a fresh backend."""
    backend, ids, keys = _filled(backend_cls, backend_kwargs)
    backend.remove(ids[:10])
    state = backend.state_dict()
    not_tensors = {name: type(value).__name__ for name, value in state.items() if not isinstance(value, torch.Tensor)}
    assert not not_tensors, f"state_dict holds non-tensors: {not_tensors}"
    restored_state = load(save({name: value.contiguous() for name, value in state.items()}))
    restored = _make(backend_cls, backend_kwargs)
    restored.add(torch.tensor([10**6]), _unit(_rng(9), 1))  # loading replaces what was there
    restored.load_state_dict(restored_state)
    assert len(restored) == len(backend), f"restored len {len(restored)}, expected {len(backend)}"
    queries = _near_duplicates(_rng(10), keys[16::8])
    scores, found = backend.search(queries, 1)
    restored_scores, restored_found = restored.search(queries, 1)
    assert found.tolist() == restored_found.tolist(), "the restored backend answers differently"
    _assert_close(scores, restored_scores, "scores before and after the round trip")


def check_invalid_input_raises(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """Keys or queries of the wrong dimension, ids that do not match the keys, and k < 1 raise ValueError."""
    backend = _make(backend_cls, backend_kwargs)
    backend.add(torch.arange(4), _unit(_rng(11), 4))
    calls: dict[str, Callable[[], object]] = {
        "keys of the wrong dim": lambda: backend.add(torch.arange(2), torch.randn(2, DIM + 1)),
        "queries of the wrong dim": lambda: backend.search(torch.randn(2, DIM - 1), 1),
        "3 ids for 2 keys": lambda: backend.add(torch.arange(3), torch.randn(2, DIM)),
        "k=0": lambda: backend.search(torch.randn(1, DIM), 0),
    }
    for what, call in calls.items():
        try:
            call()
        except ValueError:
            continue
        raise AssertionError(f"{what} did not raise ValueError")


def check_nbytes(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """``nbytes`` is a non-negative int that grows when keys are added."""
    empty = _make(backend_cls, backend_kwargs).nbytes
    backend, _, _ = _filled(backend_cls, backend_kwargs)
    assert isinstance(empty, int) and empty >= 0, f"nbytes of an empty backend is {empty!r}"
    least = N_KEYS * DIM * 2
    assert backend.nbytes - empty >= least, f"nbytes grew by {backend.nbytes - empty} for {N_KEYS} keys, < {least}"


def check_compact_frees_removed_keys_and_keeps_answers(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """``compact()`` after removals leaves ``nbytes`` no larger and every answer as it was: a bank over its budget
    compacts before evicting more, so compaction must never change what is found. (A first ``compact()`` settles
    any index build still running, whose arrival may legitimately add bytes.)"""
    backend, ids, keys = _filled(backend_cls, backend_kwargs)
    backend.remove(ids[::4])
    backend.compact()
    backend.remove(ids[1::4])
    queries = _near_duplicates(_rng(21), keys[2::4][:64])
    before_bytes, (_, before) = backend.nbytes, backend.search(queries, 3)
    backend.compact()
    _, after = backend.search(queries, 3)
    assert backend.nbytes <= before_bytes, f"nbytes grew from {before_bytes} to {backend.nbytes} on compact()"
    assert torch.equal(after[:, 0].cpu(), before[:, 0].cpu()), "compact() changed the nearest keys found"
    assert len(backend) == len(ids) - len(ids[::4]) - len(ids[1::4]), "compact() changed how many keys are live"


CHECKS: tuple[Callable[..., None], ...] = (
    check_empty_index,
    check_top1_matches_brute_force,
    check_k_larger_than_index,
    check_batched_queries,
    check_removal_honoured,
    check_readd_replaces,
    check_scores_are_cosines,
    check_persistence_round_trip,
    check_invalid_input_raises,
    check_nbytes,
    check_compact_frees_removed_keys_and_keeps_answers,
)


def check_backend(backend_cls: type[Backend], **backend_kwargs: Any) -> None:
    """Run every conformance check on ``backend_cls``; the first failure raises AssertionError."""
    for check in CHECKS:
        check(backend_cls, **backend_kwargs)


def _make(backend_cls: type[Backend], backend_kwargs: dict[str, Any]) -> Backend:
    return backend_cls(DIM, metric="cosine", device="cpu", **backend_kwargs)


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(rng: torch.Generator, n: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, DIM, generator=rng), dim=-1)


def _near_duplicates(rng: torch.Generator, keys: torch.Tensor) -> torch.Tensor:
    """Copies of ``keys`` at cosine ~0.99 to their originals, as a cache's repeated requests are."""
    return keys + 0.15 * _unit(rng, len(keys))


def _filled(backend_cls: type[Backend], backend_kwargs: dict[str, Any]) -> tuple[Backend, torch.Tensor, torch.Tensor]:
    """A backend holding N_KEYS random unit keys under sparse ids, added in a few batches."""
    backend = _make(backend_cls, backend_kwargs)
    keys = _unit(_rng(0), N_KEYS)
    ids = torch.arange(N_KEYS) * 3 + 5
    for batch in torch.arange(N_KEYS).chunk(4):
        backend.add(ids[batch], keys[batch])
    return backend, ids, keys


def _brute_force(
    queries: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    sims = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    scores, idx = sims.topk(k, dim=1)
    return scores, ids[idx]


def _expect_nothing(backend: Backend, what: str) -> None:
    scores, found = backend.search(_unit(_rng(12), 3), 4)
    assert tuple(found.shape) == (3, 4), f"{what}: ids have shape {tuple(found.shape)}, expected (3, 4)"
    assert found.dtype == torch.long, f"{what}: ids have dtype {found.dtype}, expected torch.int64"
    assert (found == -1).all(), f"{what}: expected ids -1, got {found.tolist()}"
    assert torch.isneginf(scores).all(), f"{what}: expected scores -inf, got {scores.tolist()}"


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    actual, expected = actual.detach().cpu().float(), expected.detach().cpu().float()
    if not torch.allclose(actual, expected, atol=1e-4, rtol=0):
        worst = (actual - expected).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{what}: differ by up to {worst:.3g} (atol 1e-4)")
