"""``hf-layercache warm``: fill a cache from a corpus and save a warm model directory."""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm.auto import tqdm

from ..persistence import read_header
from .common import cache_config, human_bytes, load_model, model_directory, output_directory
from .data import read_texts, tokenize


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
    saved = read_header(out)["banks"]  # what the directory holds, as `inspect` reports it
    entries, nbytes = sum(b["entries"] for b in saved.values()), sum(b["bytes"] for b in saved.values())
    line = (
        f"warmed {len(texts)} texts in {seconds:.1f}s, hit rate while warming {total['hit_rate']:.1%}; saved "
        f"{entries} entries, {human_bytes(nbytes)} in {len(saved)} bank(s) to {out}"
    )
    if total["entries"] != entries:
        unsaved = sorted(set(model.layer_cache.banks) - set(saved))
        line += f" (in memory {total['entries']} entries: banks {unsaved} derive from the saved ones and refill)"
    print(line)
    return 0
