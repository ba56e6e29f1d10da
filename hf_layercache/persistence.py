"""Warm caches on disk: ``layer_cache_config.json`` plus safetensors shards, written atomically, read defensively.

Files (fixed format, version 5: 1 kept the tenant in each entry, 2 in each bank, 3 added the values and output to
attention entries, 4 dropped their maps, 5 identifies the model by every byte of its weights, its forward config
and its adapters), beside the model's own files:

* ``layer_cache_config.json``: ``{"format_version", "config", "model", "banks", "timing", "files"}``; ``model`` is
  the identity of the model the cache was filled by (:class:`~hf_layercache.identity.ModelIdentity`: class,
  model_type, layer count, hidden size, dtype, a digest of every byte of the weights, the forward config fields, the
  adapters' digests, ``storage_dtype``); ``timing`` the rows each layer computed and the seconds they took (what a
  hit saves).
* ``layer_cache.safetensors``, or ``layer_cache-00001-of-0000N.safetensors`` with
  ``layer_cache.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map": {tensor: file}}``) as
  transformers shards its checkpoints. Tensor names are ``<bank>/<tensor>``.

Names never start with ``model`` (transformers' ``save_pretrained`` deletes stale ``model*`` shards). Files from
disk are untrusted: JSON and safetensors only, every problem is a :class:`LayerCacheFileError` naming the file.

Integrity and crash safety: the config records a blake2b digest of every shard (``"files"``), checked on load, so
a damaged shard or a set of shards from different saves is refused rather than served. A save writes every new
file under a temporary name first, then hard-links the current files into ``.layer_cache_previous/``, renames the
new files into place (the config last) and only then drops the snapshot; a reader that finds the main set
inconsistent falls back to the snapshot. An interrupted save at any point leaves the last complete save loadable;
a save that finds an interrupted one's snapshot keeps it unless the main set is intact, so two (or more) interrupted
saves in a row never replace the good snapshot with a damaged set.

Authenticity: digests catch accidents, not an attacker, who can recompute them. With an integrity key
(:mod:`hf_layercache.integrity`) the config carries an HMAC-SHA256 ``"signature"`` over everything else in it, shard
digests included, so one signature covers the header and every shard; :func:`check_signature` refuses a cache that
is unsigned or signed with another key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import CONFIG_NAME, parse_bytes
from .integrity import sign, verify

if TYPE_CHECKING:  # torch is imported where tensors are handled: reading headers (hf-layercache inspect) needs none
    import torch

FORMAT_VERSION = 5
WEIGHTS_NAME = "layer_cache.safetensors"
INDEX_NAME = "layer_cache.safetensors.index.json"
PREVIOUS_DIR = ".layer_cache_previous"
SHARD_PATTERN = re.compile(r"layer_cache-(\d{5})-of-(\d{5})\.safetensors")
_MAX_JSON_BYTES = 64 * 2**20


class LayerCacheFileError(ValueError):
    """A warm-cache file is missing, malformed, or belongs to another model."""


class LayerCacheMismatchError(LayerCacheFileError):
    """A well-formed warm cache that was saved for other weights, another model or another strategy."""


class LayerCacheIntegrityError(LayerCacheFileError):
    """A warm cache that is not signed with the configured integrity key (unsigned, altered, or another key's)."""


class LayerCacheVersionError(LayerCacheMismatchError):
    """A warm cache in another file format version (saved by another release of hf_layercache)."""

    def __init__(self, message: str, saved_config: dict[str, Any]):
        super().__init__(message)
        self.saved_config = saved_config
        """The config it was saved with, to start a cache of the same kind cold."""


def check_timing(timing: Any, directory: str | os.PathLike) -> dict[str, dict[str, float]]:
    """The header's ``timing`` (per layer, ``{"rows": int, "seconds": float}`` computed by the process that filled the
    cache), refused unless it is exactly that: it feeds ``stats()["seconds_saved"]``."""
    ok = isinstance(timing, dict) and all(
        isinstance(name, str)
        and isinstance(t, dict)
        and set(t) == {"rows", "seconds"}
        and isinstance(t["rows"], int)
        and not isinstance(t["rows"], bool)
        and t["rows"] >= 0
        and isinstance(t["seconds"], int | float)
        and not isinstance(t["seconds"], bool)
        and 0 <= t["seconds"] < float("inf")
        for name, t in timing.items()
    )
    if not ok:
        raise LayerCacheFileError(
            f"{Path(directory) / CONFIG_NAME}: 'timing' must map layer names to {{'rows': int >= 0, 'seconds': "
            "finite float >= 0}."
        )
    return timing


# --- writing --------------------------------------------------------------------------------------------------------
def _temporary(path: Path, write) -> Path:
    """Write ``path``'s new content to a temporary file beside it (same file system, so renaming is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _cache_files(directory: Path) -> list[Path]:
    """The config, index and shards of the cache in ``directory``."""
    return sorted(p for p in directory.glob("layer_cache*") if p.is_file() and not p.name.endswith(".tmp"))


def _snapshot_previous(directory: Path) -> None:
    """Hard-link the current cache files into ``.layer_cache_previous`` (no copy), replacing an older snapshot.

    A snapshot left by an interrupted save is the last complete save whenever the main set is not intact (the
    interrupted save was renaming files into place): it is then kept, not replaced by the damaged set."""
    if not (directory / CONFIG_NAME).is_file():
        return
    if (directory / PREVIOUS_DIR).is_dir() and not _is_intact(directory):
        return
    staging = Path(tempfile.mkdtemp(prefix=".layer_cache_previous.", dir=directory))
    for path in _cache_files(directory):
        os.link(path, staging / path.name)
    shutil.rmtree(directory / PREVIOUS_DIR, ignore_errors=True)
    os.replace(staging, directory / PREVIOUS_DIR)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with every one whose storage an earlier one uses copied: entries may share a tensor in memory
    (the attention strategy's layers keep one mask per request), and safetensors refuses to write shared storage."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in seen and t.numel() else t
        seen.add(storage)
    return out


def write_cache(
    directory: str | os.PathLike,
    header: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    max_shard_size: int | str = "5GB",
    key: bytes | None = None,
) -> list[Path]:
    """Write a warm cache crash-safely (see the module docstring), signed with ``key`` when one is given; return the
    files written."""
    from safetensors.torch import save_file  # imports torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _unshared({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
    shards = _shards(tensors, parse_bytes(max_shard_size, "max_shard_size"))
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"layer_cache-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    pending: list[tuple[Path, Path]] = []
    digests: dict[str, str] = {}
    try:
        for name, shard in zip(names, shards, strict=True):
            tmp = _temporary(directory / name, lambda t, s=shard: save_file(s, t, metadata={"format": "pt"}))
            pending.append((tmp, directory / name))
            digests[name] = file_digest(tmp)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {t: name for name, shard in zip(names, shards, strict=True) for t in shard},
            }
            text = json.dumps(index, indent=2, sort_keys=True)
            pending.append(
                (_temporary(directory / INDEX_NAME, lambda t: Path(t).write_text(text)), directory / INDEX_NAME)
            )
        header = {"format_version": FORMAT_VERSION, "files": digests, **header}
        if key is not None:
            header["signature"] = sign(key, _signed_bytes(header))
        payload = json.dumps(header, indent=2)
        pending.append(
            (_temporary(directory / CONFIG_NAME, lambda t: Path(t).write_text(payload)), directory / CONFIG_NAME)
        )
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    _snapshot_previous(directory)
    for tmp, final in pending:
        os.replace(tmp, final)
    written = [final for _, final in pending]
    for path in _cache_files(directory):
        if path not in written:
            path.unlink()
    for leftover in directory.glob(".layer_cache*"):  # the snapshot, and debris of earlier interrupted saves
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return written


# --- reading --------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise LayerCacheFileError(f"{path} is larger than {_MAX_JSON_BYTES} bytes; refusing to read it.")
        if path.is_symlink():
            raise LayerCacheFileError(f"{path} is a symbolic link; a warm cache's files must be its own.")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LayerCacheFileError(f"Cannot read {path}: {err}") from None
    except RecursionError:
        raise LayerCacheFileError(f"Cannot read {path}: it is nested too deeply.") from None


def has_cache(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_NAME).is_file()


def read_header(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise LayerCacheFileError(f"No warm layer cache in {directory}: {CONFIG_NAME} is missing.")
    header = _read_json(path)
    if not isinstance(header, dict) or not isinstance(header.get("config"), dict):
        raise LayerCacheFileError(f"{path} is not a layer cache config (expected an object with a 'config' object).")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise LayerCacheVersionError(
            f"{path} has format_version {version!r}; this hf_layercache reads {FORMAT_VERSION}.", header["config"]
        )
    if not isinstance(header.get("model"), dict):
        raise LayerCacheFileError(f"{path} has no 'model' identity object.")
    return header


def shard_files(directory: Path, header: dict[str, Any]) -> list[Path]:
    """The shard files of the cache in ``directory`` whose config is ``header``; symbolic links are refused (a link
    to a valid file elsewhere would put files outside the set in it)."""
    files = _listed_shards(directory, header)
    links = [path for path in files if path.is_symlink()]
    if links:
        raise LayerCacheFileError(f"{links[0]} is a symbolic link; a warm cache's files must be its own.")
    return files


def _listed_shards(directory: Path, header: dict[str, Any]) -> list[Path]:
    single, index_path = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if header.get("files") == {WEIGHTS_NAME: header["files"].get(WEIGHTS_NAME)}:
        return [single]  # a single-file save; an index beside it is a sharded save's, not yet removed
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LayerCacheFileError(f"{index_path} has no valid 'weight_map' of tensor name -> shard file.")
        files = sorted(set(weight_map.values()))
        bad = [f for f in files if not SHARD_PATTERN.fullmatch(f)]
        if bad:
            raise LayerCacheFileError(
                f"{index_path} names shard files {bad[:3]} that are not 'layer_cache-NNNNN-of-NNNNN.safetensors' "
                "in the same directory; refusing to read them."
            )
        return [directory / f for f in files]
    if single.is_file():
        return [single]
    raise LayerCacheFileError(f"No layer cache tensors in {directory}: neither {WEIGHTS_NAME} nor {INDEX_NAME} exists.")


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(directory: Path, header: dict[str, Any]) -> None:
    """Check that the shards are exactly those ``header`` (the directory's own) lists, each with its digest."""
    expected = header.get("files")
    if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
        raise LayerCacheFileError(f"{directory / CONFIG_NAME} has no 'files' object of shard name -> digest.")
    found = {path.name for path in shard_files(directory, header)}
    if found != set(expected):
        raise LayerCacheFileError(f"{directory} holds shards {sorted(found)} but its config lists {sorted(expected)}.")
    for name in sorted(found):
        if file_digest(directory / name) != expected[name]:
            raise LayerCacheFileError(
                f"{directory / name} does not match the digest in {CONFIG_NAME}: it is damaged or from another save."
            )


def _is_intact(directory: Path) -> bool:
    try:
        verify_files(directory, read_header(directory))
    except LayerCacheFileError:
        return False
    return True


def _signed_bytes(header: dict[str, Any]) -> bytes:
    """The canonical bytes a header's signature covers: all of it but the signature, as sorted compact JSON."""
    unsigned = {name: value for name, value in header.items() if name != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode("utf-8")


def check_signature(directory: str | os.PathLike, header: dict[str, Any], key: bytes) -> None:
    """Refuse (:class:`LayerCacheIntegrityError`) a header that is not signed with ``key``. Its shard digests were
    checked against the files when the cache was opened, so a valid signature vouches for every shard too."""
    path = Path(directory) / CONFIG_NAME
    if "signature" not in header:
        raise LayerCacheIntegrityError(
            f"{path} is not signed, and an integrity key is set: refusing an unsigned cache. Save it again with the "
            "key, or unset integrity_key (and HF_LAYERCACHE_INTEGRITY_KEY) to trust unsigned caches."
        )
    if not verify(key, header["signature"], _signed_bytes(header)):
        raise LayerCacheIntegrityError(
            f"{path} has a signature that does not match its content under the configured integrity key: it was "
            "altered after it was saved, or signed with another key. Refusing to load it."
        )


@dataclass(frozen=True)
class WarmCache:
    """A warm cache on disk, opened once: the directory holding one intact save of it and that save's header."""

    directory: Path
    """``directory`` itself, or the snapshot an interrupted save left behind (:data:`PREVIOUS_DIR`)."""
    header: dict[str, Any]
    """The parsed ``layer_cache_config.json`` of that save: ``config``, ``model``, ``banks``, ``files``."""


def open_cache(directory: str | os.PathLike) -> WarmCache:
    """The warm cache in ``directory`` if its files are one intact save, else the snapshot an interrupted save left
    behind; :class:`LayerCacheFileError` when neither is."""
    directory = Path(directory)
    try:
        header = read_header(directory)
        verify_files(directory, header)
        return WarmCache(directory, header)
    except LayerCacheFileError as err:
        previous = directory / PREVIOUS_DIR
        if isinstance(err, LayerCacheVersionError) or not (previous / CONFIG_NAME).is_file():
            raise
        header = read_header(previous)
        verify_files(previous, header)
        warnings.warn(
            f"The layer cache in {directory} is damaged or half-saved; loading the previous save.", stacklevel=3
        )
        return WarmCache(previous, header)
