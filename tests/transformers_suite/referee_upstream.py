"""Fetch transformers' own ``tests/test_modeling_common.py`` for the *installed* transformers, like a dependency.

The PyPI sdist of transformers ships ``tests/test_modeling_common.py`` (``ModelTesterMixin``) but neither the
per-model test files nor two modules it imports relatively (``tests/exporters/test_export.py`` and
``tests/generation/test_utils.py``). This module

1. finds the sdist ``transformers-<installed version>.tar.gz``: ``$HF_LAYERCACHE_REFEREE_SDIST`` (a file or a folder
   holding it), else the download cache ``$HF_LAYERCACHE_REFEREE_CACHE`` (default ``<system temp>/
   hf_layercache_referee``), else ``pip download --no-deps --no-binary :all: transformers==<version>`` into that cache;
2. extracts only the files listed in :data:`UPSTREAM_FILES` into a fresh temporary folder as the package
   ``transformers_upstream_tests``, with this project's stand-ins (:mod:`referee_stubs`) for the two missing modules;
3. puts that folder on ``sys.path`` so ``from transformers_upstream_tests.test_modeling_common import
   ModelTesterMixin`` works.

No upstream test code lives in this repository.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "transformers_upstream_tests"
UPSTREAM_FILES = ("test_modeling_common.py",)
"""Files taken from the sdist's ``tests/``; ``test_configuration_common.py`` is left out: it imports
``tests/utils/test_configuration_utils.py``, which the sdist does not ship either."""
STUBS = {
    "exporters/test_export.py": "ExportTesterMixin",
    "generation/test_utils.py": "GenerationTesterMixin",
}
"""Modules the sdist lacks -> the class ``test_modeling_common`` imports from them, provided by ``referee_stubs``."""
HERE = Path(__file__).resolve().parent


def transformers_version() -> str:
    return importlib.metadata.version("transformers")


def cache_dir() -> Path:
    return Path(os.environ.get("HF_LAYERCACHE_REFEREE_CACHE") or Path(tempfile.gettempdir()) / "hf_layercache_referee")


def sdist_path(version: str | None = None, download: bool = True) -> Path:
    """The sdist of ``transformers==version`` (default: the installed one), downloaded once into :func:`cache_dir`."""
    version = version or transformers_version()
    name = f"transformers-{version}.tar.gz"
    explicit = os.environ.get("HF_LAYERCACHE_REFEREE_SDIST")
    if explicit:
        path = Path(explicit)
        path = path / name if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"HF_LAYERCACHE_REFEREE_SDIST={explicit!r}: no {name} there")
        return path
    target = cache_dir() / "sdist"
    path = target / name
    if path.is_file():
        return path
    if not download:
        raise FileNotFoundError(path)
    target.mkdir(parents=True, exist_ok=True)
    # Download into a private folder, then rename: concurrent runs never see a half-written tarball.
    with tempfile.TemporaryDirectory(dir=target, prefix=".download-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", f"transformers=={version}", "-d", tmp,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        found = list(Path(tmp).glob("transformers-*.tar.gz"))
        if not found:
            # --no-build-isolation needs setuptools here; without it let pip build metadata in isolation.
            command.remove("--no-build-isolation")
            result = subprocess.run(command, capture_output=True, text=True)
            found = list(Path(tmp).glob("transformers-*.tar.gz"))
        if not found:
            raise RuntimeError(
                f"could not download the transformers {version} sdist:\n{' '.join(command)}\n{result.stdout}\n"
                f"{result.stderr}"
            )
        os.replace(found[0], path)
    return path


def extract(destination: Path, sdist: Path | None = None) -> Path:
    """Write the package ``transformers_upstream_tests`` under ``destination``; returns the package folder."""
    sdist = sdist or sdist_path()
    package = destination / PACKAGE
    package.mkdir(parents=True)
    wanted = set(UPSTREAM_FILES)
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 3 and parts[1] == "tests" and parts[2] in wanted and member.isfile():
                source = tar.extractfile(member)
                assert source is not None
                (package / parts[2]).write_bytes(source.read())
                wanted.discard(parts[2])
    if wanted:
        raise RuntimeError(f"{sdist} has no tests/{', tests/'.join(sorted(wanted))}")
    (package / "__init__.py").write_text(f'"""tests/ of {sdist.name}, extracted by hf_layercache\'s referee."""\n')
    for relative, name in STUBS.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(
            f'"""Not in the sdist: this project\'s stand-in (tests/transformers_suite/referee_stubs.py)."""\n'
            f"from referee_stubs import {name}  # noqa: F401\n"
        )
    return package


_prepared: Path | None = None


def prepare() -> Path:
    """Extract once per process into a temporary folder (removed at exit) and make the package importable."""
    global _prepared
    if _prepared is None:
        root = Path(tempfile.mkdtemp(prefix="hf_layercache_upstream_tests-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        extract(root)
        for path in (str(HERE), str(root)):
            if path not in sys.path:
                sys.path.insert(0, path)
        _prepared = root
    return _prepared


if __name__ == "__main__":  # fetch only: `python tests/transformers_suite/referee_upstream.py`
    print(sdist_path())
