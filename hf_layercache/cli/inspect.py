"""``hf-layercache inspect``: what a warm cache holds, read from its JSON header and the shards' safetensors headers.

Neither torch nor the model is loaded: the shards are opened for numpy (``safe_open`` reads only their headers
here), and ``--verify`` hashes the files' bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..config import LayerCacheConfig, StrategyConfig
from ..persistence import FORMAT_VERSION, LayerCacheFileError, read_header, shard_files, verify_files
from .common import CLIError, human_bytes

BUILTIN_STRATEGIES = ("exact", "prefix", "semantic", "attention", "segment")


def strategy_section(strategy: str) -> type[StrategyConfig] | None:
    """A built-in strategy's config class, read from its torch-free ``config`` module (a strategy that is not built
    in: ``None``, as importing its code could import anything)."""
    if strategy not in BUILTIN_STRATEGIES:
        return None
    module = importlib.import_module(f"hf_layercache.strategies.{strategy}.config")
    return next(
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, StrategyConfig) and value is not StrategyConfig
    )


def strategy_fields(strategy: str) -> tuple[str, ...] | None:
    """The fields a built-in strategy reads beyond :func:`common_fields`: the common ones its config class names in
    ``reads``, then its own."""
    section = strategy_section(strategy)
    return None if section is None else (*section.reads, *section.field_names())


def common_fields() -> tuple[str, ...]:
    """The fields every strategy reads: the config's own fields that no built-in strategy's config class names in
    ``reads`` (which layers, the banks' limits and eviction, the tenant)."""
    read = {name for strategy in BUILTIN_STRATEGIES for name in strategy_section(strategy).reads}
    return tuple(f.name for f in dataclasses.fields(LayerCacheConfig) if f.name not in read and f.name != "options")


# Bytes per element of each safetensors dtype name: the only such table in hf_layercache. safetensors has its own
# only in safetensors.torch (private _TYPES and _SIZE, keyed by torch dtypes), which would import torch.
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def describe_cache(directory: str | os.PathLike) -> dict[str, Any]:
    """What the warm cache in ``directory`` holds, from its JSON header and the safetensors headers only.

    ``safe_open`` reads each shard's header (names, dtypes, shapes); no tensor data is read and no model is loaded.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CLIError(f"{directory}: no such directory")
    header = read_header(directory)
    banks: dict[str, dict[str, Any]] = {
        name: {
            "entries": info.get("entries"),
            "bytes": info.get("bytes"),
            "tensors": 0,
            "tensor_bytes": 0,
            "dtypes": set(),
        }
        for name, info in header.get("banks", {}).items()
    }
    files = shard_files(directory, header)
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:  # headers only; "pt" would import torch
                for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    _count_tensor(banks, name, f.get_slice(name))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise LayerCacheFileError(f"Cannot read layer cache shard {path}: {err}") from None
    for bank in banks.values():
        bank["dtypes"] = sorted(bank["dtypes"])
    return {
        "directory": str(directory),
        "format_version": header["format_version"],
        "strategy": header["config"].get("strategy"),
        "config": header["config"],
        "model": header["model"],
        "files": {path.name: path.stat().st_size for path in files},
        "banks": banks,
    }


def _count_tensor(banks: dict[str, dict[str, Any]], name: str, tensor_slice) -> None:
    bank_name = name.partition("/")[0]
    bank = banks.setdefault(
        bank_name, {"entries": None, "bytes": None, "tensors": 0, "tensor_bytes": 0, "dtypes": set()}
    )
    dtype = tensor_slice.get_dtype()
    numel = 1
    for size in tensor_slice.get_shape():
        numel *= size
    bank["tensors"] += 1
    bank["tensor_bytes"] += numel * _DTYPE_BYTES.get(dtype, 0)
    bank["dtypes"].add(dtype)


def _fields(config: dict[str, Any], names) -> str:
    return ", ".join(f"{name} {config[name]!r}" for name in names if name in config)


def _config_lines(config: dict[str, Any]) -> list[str]:
    """The common fields, then only those the cache's strategy reads (all the others, for a strategy that is not
    built in: which fields it reads is known only to its class, and importing it would import torch)."""
    strategy = config.get("strategy")
    lines = [
        f"strategy   {strategy}, " + _fields(config, ("policy", "policy_kwargs", "namespace", "layers", "bank_device")),
        "limits     " + _fields(config, ("max_entries", "max_memory", "namespace_quota", "storage_dtype")),
    ]
    own = strategy_fields(strategy)
    if own is None:
        common = common_fields()
        own = [name for name in config if name not in common]
        label = "options"
    else:
        label = str(strategy)
    if own:
        lines.append(f"{label:<10} " + _fields(config, own))
    return lines


def format_cache(info: dict[str, Any]) -> str:
    config, model = info["config"], info["model"]
    lines = [
        f"warm layer cache in {info['directory']} (format version {info['format_version']}, this hf-layercache "
        f"reads {FORMAT_VERSION})",
        *_config_lines(config),
        f"model      {model.get('class')} ({model.get('model_type')}), {model.get('num_layers')} cached layers, "
        f"hidden size {model.get('hidden_size')}, {model.get('dtype')}, weights hash {model.get('weights_hash')}",
        "files      "
        + ("(digests verified) " if info.get("verified") else "")
        + ", ".join(f"{name} ({human_bytes(size)})" for name, size in info["files"].items()),
        "",
        f"{'bank':<32} {'entries':>8} {'in memory':>10} {'on disk':>10} {'tensors':>8}  dtypes",
    ]
    for name, bank in info["banks"].items():
        memory = human_bytes(bank["bytes"]) if bank["bytes"] is not None else "?"
        lines.append(
            f"{name:<32} {bank['entries']!s:>8} {memory:>10} {human_bytes(bank['tensor_bytes']):>10} "
            f"{bank['tensors']:>8}  {', '.join(bank['dtypes'])}"
        )
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    info = describe_cache(args.directory)
    if args.verify:
        verify_files(Path(args.directory), read_header(args.directory))  # a damaged or mixed set raises
        info["verified"] = True
    print(json.dumps(info, indent=2) if args.json else format_cache(info))
    return 0
