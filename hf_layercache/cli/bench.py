"""``hf-layercache bench``: uncached against cached on a data file, per pass and threshold, with speed, hit rates and
fidelity, written as ``results.json`` and two plots."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from ..integration import disable, enable
from .common import CLIError, cache_config, load_model, model_directory, output_directory
from .data import read_texts, tokenize
from .measure import (
    LOW_FIDELITY,
    NOISE_TOLERANCE,
    _counters,
    _fidelity,
    _hit_rates,
    _overall,
    _timed,
    low_fidelity_warning,
    pooled,
    too_noisy,
)
from .plots import _pyplot, write_plots

LOSSLESS = ("exact", "prefix")
"""Strategies that ignore ``threshold``: a threshold sweep over them would only repeat one measurement."""


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
    replaced = (out / "results.json").exists()
    results["plots"] = write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(_bench_table(runs))
    for r in runs:
        what = f"threshold {r['threshold']}, pass {r['pass']}" if r["threshold"] is not None else f"pass {r['pass']}"
        warning = low_fidelity_warning(what, r["fidelity"], len(texts))
        if warning is not None:
            print(warning)
    note = uncached_spread_note(runs)
    if note is not None:
        print(note)
    written = f"{out / 'results.json'} and {', '.join(results['plots'])}"
    print(f"wrote {written}" + (", replacing those of an earlier run there" if replaced else ""))
    return 0


def uncached_spread_note(runs: list[dict]) -> str | None:
    """A warning when the uncached side, which does the same work in every run, took times too spread to compare
    the runs' speeds (a threshold sweep on a busy machine), else ``None``."""
    times = [r["uncached_seconds"] for r in runs]
    if len(times) < 2 or not too_noisy(times):
        return None
    return (
        f"note: the uncached side did the same work in every run but took {min(times):.2f}s to {max(times):.2f}s "
        f"(beyond +-{NOISE_TOLERANCE:.0%} of the median): the machine was busy, so speeds that differ by as much "
        "between runs are noise, not the thresholds or passes. Rerun on an idle machine or with OMP_NUM_THREADS=1."
    )


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
        f"{'fidelity mean':>13} {'min':>8} {f'< {LOW_FIDELITY}':>6}"
    ]
    for r in runs:
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
        lines.append(
            f"{threshold:>9} {r['pass']:>4} {r['hit_rate']:>8.1%} {r['uncached_seconds']:>8.2f}s "
            f"{r['cached_seconds']:>8.2f}s {r['speed_ratio']:>6.2f}x {r['fidelity']['mean']:>13.5f} "
            f"{r['fidelity']['min']:>7.4f}{'!' if r['fidelity']['low'] else ' '} {r['fidelity']['low']:>6}"
        )
    return "\n".join(lines)
