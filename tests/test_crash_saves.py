"""Saves killed at every step (issue #16 item 9): after any sequence of interrupted saves, the last complete one loads.

A kill -9 stops a process between two system calls. Each save here runs with the file-system calls that change a
directory (``replace``, ``link``, ``unlink``, ``rmdir``, ``mkdir``) counted; to kill it before call ``k``, the test
copies the directory as it stands at that moment (the image a kill would leave on disk) and stops the save there.
Two consecutive saves are killed at every pair of steps, each pair starting from one complete save.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from hf_layercache import persistence
from hf_layercache.persistence import CONFIG_NAME, open_cache, write_cache
from hf_layercache.shards import read_tensors

CALLS = ("replace", "link", "unlink", "rmdir", "mkdir")


class Killed(BaseException):
    """Raised where the kill happens; nothing of the save runs after it (BaseException: no cleanup catches it)."""


def tensors_of(generation: int, shards: int) -> dict[str, torch.Tensor]:
    """``shards`` tensors of 64 float32 (256 bytes, one per shard at a 300-byte shard size) holding ``generation``."""
    return {f"bank/t{i}": torch.full((64,), float(generation)) for i in range(shards)}


def save(directory: Path, generation: int, shards: int, kill_before: int | None, image: Path) -> tuple[bool, int]:
    """Save ``generation``, killed before its ``kill_before``-th directory change (``None``: let it finish).

    Returns whether the save committed (its config was renamed into place before the kill) and how many directory
    changes it made; a killed save leaves its on-disk image in ``image`` and the test carries on from there."""
    real = {name: getattr(os, name) for name in CALLS}
    state = {"calls": 0, "committed": False}

    def counted(name):
        def call(*args, **kwargs):
            if state["calls"] == kill_before:
                for restore, function in real.items():
                    setattr(os, restore, function)
                shutil.copytree(directory, image, symlinks=True)
                raise Killed
            state["calls"] += 1
            real[name](*args, **kwargs)
            if name == "replace" and Path(args[1]).name == CONFIG_NAME and Path(args[1]).parent == directory:
                state["committed"] = True

        return call

    for name in CALLS:
        setattr(os, name, counted(name))
    try:
        header = {"config": {"strategy": "exact"}, "model": {}, "generation": generation}
        write_cache(directory, header, tensors_of(generation, shards), max_shard_size=300)
    except Killed:
        return state["committed"], state["calls"]
    finally:
        for name, function in real.items():
            setattr(os, name, function)
    shutil.copytree(directory, image, symlinks=True)
    return True, state["calls"]


def loaded_generation(directory: Path) -> int:
    warm = open_cache(directory)
    values = {t.unique().item() for t in read_tensors(warm).values()}
    assert values == {float(warm.header["generation"])}, "a mixed set of shards was loaded"
    return warm.header["generation"]


def steps(shards: int, tmp_path: Path, label: str) -> int:
    """How many directory changes a save makes over an existing complete save."""
    directory = tmp_path / f"count-{label}"
    write_cache(directory, {"config": {}, "model": {}}, tensors_of(0, shards), max_shard_size=300)
    return save(directory, 1, shards, None, tmp_path / f"count-{label}-image")[1]


@pytest.mark.parametrize(("first_shards", "second_shards"), [(1, 1), (2, 3), (3, 1)])
def test_two_saves_killed_at_every_pair_of_steps_leave_the_last_complete_save_loadable(
    tmp_path, first_shards, second_shards, recwarn
):
    first_steps, second_steps = steps(first_shards, tmp_path, "a"), steps(second_shards, tmp_path, "b")
    runs = 0
    for kill_first in [*range(first_steps), None]:
        for kill_second in [*range(second_steps), None]:
            base = tmp_path / f"run{runs}"
            write_cache(base, {"config": {}, "model": {}, "generation": 0}, tensors_of(0, 2), max_shard_size=300)
            first_committed, _ = save(base, 1, first_shards, kill_first, tmp_path / f"run{runs}-a")
            second_committed, _ = save(
                tmp_path / f"run{runs}-a", 2, second_shards, kill_second, tmp_path / f"run{runs}-b"
            )
            expected = 2 if second_committed else 1 if first_committed else 0
            assert loaded_generation(tmp_path / f"run{runs}-b") == expected, (kill_first, kill_second)
            runs += 1
    assert runs == (first_steps + 1) * (second_steps + 1) and first_steps >= 5


def test_a_complete_save_after_killed_ones_removes_their_debris(tmp_path):
    write_cache(tmp_path / "c", {"config": {}, "model": {}, "generation": 0}, tensors_of(0, 2), max_shard_size=300)
    save(tmp_path / "c", 1, 3, 4, tmp_path / "killed")
    assert any(p.name.startswith(".") for p in (tmp_path / "killed").iterdir())
    write_cache(tmp_path / "killed", {"config": {}, "model": {}, "generation": 2}, tensors_of(2, 1))
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == sorted([CONFIG_NAME, "layer_cache.safetensors"])
    assert loaded_generation(tmp_path / "killed") == 2
    assert persistence.PREVIOUS_DIR not in os.listdir(tmp_path / "killed")
