"""The command line's arguments (argparse): ``demo``, ``bench``, ``warm`` and ``inspect`` with their options.

Building and using the parser imports nothing heavy: the only help that names what the registries hold (the cache
options' strategies, backends and policies) is filled in when that help is printed.
"""

from __future__ import annotations

import argparse

from .. import __version__
from ..registry import available_backends, available_policies, available_strategies
from .common import library

_REGISTRIES = {"strategies": available_strategies, "backends": available_backends, "policies": available_policies}


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser, whose options' ``names_help`` templates (``{strategies}``, ``{backends}``,
    ``{policies}``) become their help when the help is printed: the registries fill as the package's strategies,
    backends and policies import (torch, faiss, annoy: seconds), which parsing the arguments never needs."""

    def format_help(self) -> str:
        templated = [action for action in self._actions if getattr(action, "names_help", None)]
        if templated:
            library()
            names = {kind: ", ".join(registered()) for kind, registered in _REGISTRIES.items()}
            for action in templated:
                action.help = action.names_help.format(**names)
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-layercache", description="Layer-wise caching for Transformers models.")
    parser.add_argument("--version", action="version", version=f"hf-layercache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)

    demo = commands.add_parser("demo", help="first, repeated and similar-input passes on a small model")
    demo.add_argument("--model", help="model directory (default: the embedded all-MiniLM-L6-v2)")
    demo.add_argument("--repeats", type=int, default=5, help="timings are medians over this many repeats (default 5)")

    bench = commands.add_parser("bench", help="uncached vs cached on a data file: speed, hit rates, fidelity")
    _add_model_and_data(bench)
    _add_cache_options(bench)
    bench.add_argument(
        "--threshold-sweep",
        nargs=3,
        type=float,
        metavar=("START", "STOP", "STEP"),
        help="one cold cache per threshold from START to STOP (inclusive); approximate strategies only",
    )
    bench.add_argument("--passes", type=int, default=1, help="times the data is sent through one cache (default 1)")
    bench.add_argument("--out", default="hf-layercache-bench", help="directory for results.json and the plots")

    warm = commands.add_parser("warm", help="fill a cache from a corpus and save a warm model directory")
    _add_model_and_data(warm)
    _add_cache_options(warm)
    warm.add_argument("--out", required=True, help="directory to save the warm model into")

    inspect = commands.add_parser("inspect", help="what a warm cache holds, without loading the model")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--verify", action="store_true", help="also check every shard's digest (reads every byte)")
    return parser


def _add_model_and_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (weights, config and tokenizer)")
    parser.add_argument("--data", required=True, help=".txt (a text per line), .jsonl or .csv")
    parser.add_argument("--column", default="text", help="field of .jsonl / column of .csv (default: text)")
    parser.add_argument("--limit", type=int, help="use only the first N texts")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward call (default 16)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text, longer are cut (default 128)")
    parser.add_argument(
        "--padding",
        choices=("longest", "max_length"),
        default="longest",
        help="pad each batch to its longest text (as a server would) or every text to --max-length",
    )
    parser.add_argument("--model-class", default="AutoModel", help="transformers class to load (default AutoModel)")


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cache", "flags override --config; unset fields keep LayerCacheConfig's defaults")
    group.add_argument("--config", help="a LayerCacheConfig as JSON (any field, e.g. strategy-specific ones)")
    _names_help(group.add_argument("--strategy"), "one of {strategies} (default exact)")
    _names_help(group.add_argument("--backend"), "similarity index: {backends}")
    _names_help(group.add_argument("--policy"), "eviction: {policies} (default lru)")
    group.add_argument("--threshold", type=float, help="cosine similarity a hit needs (approximate strategies)")
    group.add_argument("--max-entries", type=int, help="most entries per bank")
    group.add_argument("--max-memory", help="byte budget of all banks, e.g. 512MB")


def _names_help(action: argparse.Action, template: str) -> None:
    """Give ``action`` a help naming registered classes, filled in by :class:`_CommandParser` when it is printed."""
    action.names_help = template
    action.help = template
