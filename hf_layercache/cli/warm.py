"""``hf-layercache warm``: fill a cache from a corpus and save a warm model directory."""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm.auto import tqdm

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
    print(
        f"warmed {len(texts)} texts in {seconds:.1f}s: {total['entries']} entries, {human_bytes(total['bytes'])} "
        f"in {len(model.layer_cache.banks)} bank(s), hit rate while warming {total['hit_rate']:.1%}; saved to {out}"
    )
    return 0
