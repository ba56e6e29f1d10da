"""The ``hf-layercache`` command: ``demo``, ``bench``, ``warm`` and ``inspect``.

Every subcommand works offline on model directories (``local_files_only``, ``HF_HUB_OFFLINE=1``): the command is
meant for measuring and preparing caches on the machine that serves, not for fetching models. Speed is always
reported as a ratio measured in the same run, uncached time over cached time, where "uncached" is the same model
under ``model.layer_cache.bypass()``, so both sides share weights, threads and machine noise.

The arguments are parsed before anything heavy is imported: a subcommand's module, and with it torch and
transformers, is imported only when that subcommand runs. ``--help``, ``--version``, argument errors and
``inspect`` import neither, as long as ``hf_layercache`` itself was imported without them: the console script's
entry point, ``hf_layercache_cli.main`` (a module outside this package), imports it so; ``python -m
hf_layercache.cli`` and code that imported the package first pay for the whole package.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from .common import CLIError
from .parser import build_parser

_EXPORTS = {  # the names this module always had, by the submodule that holds them, imported on first use
    "DEMO_SIMILAR": "demo",
    "DEMO_TEXTS": "demo",
    "LOSSLESS": "bench",
    "TOKENIZER_FILES": "common",
    "cache_config": "common",
    "describe_cache": "inspect",
    "format_cache": "inspect",
    "human_bytes": "common",
    "load_model": "common",
    "model_directory": "common",
    "output_directory": "common",
    "pooled": "measure",
    "read_texts": "data",
    "run_bench": "bench",
    "run_demo": "demo",
    "run_inspect": "inspect",
    "run_warm": "warm",
    "tokenize": "data",
    "write_plots": "plots",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 on success, 2 on a user error)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # model directories only; never reach for the Hub, even by accident
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's own errors (and --help) end here; report their status, do not exit
        return int(exit_.code or 0)
    try:
        command = importlib.import_module(f"{__name__}.{args.command}")  # only now: bench imports torch
        status = getattr(command, f"run_{args.command}")(args)
        sys.stdout.flush()  # inside the try: a short output is only written here, and may meet a closed pipe too
        return status
    except BrokenPipeError:  # the reader went away (| head): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's final flush is silent too
        return 128 + 13  # 128 + SIGPIPE, the status of a tool that SIGPIPE ended
    except (CLIError, ValueError, OSError) as err:  # ValueError includes every LayerCacheFileError
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the library wrote
        print(f"hf-layercache: error: {message}", file=sys.stderr)
        return 2


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["CLIError", "build_parser", "main", *_EXPORTS]
