"""Real documents and the two request streams the semantic benchmarks serve (issue #17).

Documents are public real text installed offline from package registries, 50 to 128 tokens each, labelled by where
they come from (the label a downstream probe predicts):

* the Lee news corpus (gensim's test data, ``lee_background.cor`` and ``lee.cor``: 349 Australian news stories),
  label ``news``; a story is cut at a sentence end to fit 128 tokens;
* Debian's ``fortunes`` (``/usr/share/games/fortunes``): quotes, jokes, poems and definitions, labelled by their
  file (``computers``, ``songs-poems``, ``politics``, ...); files with fewer than 40 usable fortunes are left out.

Streams (batches of ``BATCH`` requests, at most ``MAX_TOKENS`` tokens each):

* **natural**: distinct documents in random order, no repeats (what a cache sees on traffic that does not repeat);
* **campaign**: Zipf(1.1) popularity over a pool of a few hundred documents; half of the repeats are sent verbatim,
  half lightly edited (its numbers changed, a reference id appended, or a greeting added), as campaign mail is.

Install what is missing:

    pip install gensim                 # or: pip install -e .[bench]
    apt-get install -y fortunes        # /usr/share/games/fortunes
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORTUNES = Path("/usr/share/games/fortunes")
BATCH = 16
MAX_TOKENS = 128
MIN_TOKENS = 50
_MIN_PER_LABEL = 40
_GREETINGS = ("Hi all,", "Dear customer,", "Hello team,", "Good morning,", "Hi there!", "Dear colleagues,")


@dataclass(frozen=True)
class Document:
    text: str
    label: str
    origin: int
    """Index of the pool document it is (or is an edit of), so probes can cross-fit by document."""


@dataclass(frozen=True)
class Request:
    doc: Document
    text: str
    edit: str | None
    """``None`` for a document sent as it is; else the kind of light edit."""
    repeat: bool


def _gensim_data() -> Path:
    spec = importlib.util.find_spec("gensim")  # located, not imported: only its data files are read
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" if spec else None
    if path is None or not (path / "lee_background.cor").exists():
        sys.exit("gensim's test corpora are missing: run `pip install gensim` (or `pip install -e .[bench]`).")
    return path


def _news() -> list[str]:
    data = _gensim_data()
    lines = []
    for name in ("lee_background.cor", "lee.cor"):
        lines += (data / name).read_text(encoding="latin-1").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip()]


def _fortunes() -> dict[str, list[str]]:
    if not FORTUNES.is_dir():
        sys.exit(f"{FORTUNES} is missing: run `apt-get install -y fortunes`.")
    out = {}
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or path.is_dir() or path.is_symlink():
            continue  # .dat indexes, .u8 links, the offensive/ subfolder
        items = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
        out[path.name] = [" ".join(item.split()) for item in items if item.strip()]
    return out


def _fit(text: str, tokenizer, min_tokens: int, max_tokens: int) -> str | None:
    """``text`` cut at its last sentence end within ``max_tokens`` tokens (special tokens included), or ``None``
    when that leaves fewer than ``min_tokens``."""
    length = len(tokenizer(text)["input_ids"])
    if length <= max_tokens:
        return text if length >= min_tokens else None
    cut = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        longer = f"{cut} {sentence}".strip()
        if len(tokenizer(longer)["input_ids"]) > max_tokens:
            break
        cut = longer
    return cut if cut and len(tokenizer(cut)["input_ids"]) >= min_tokens else None


def documents(tokenizer, min_tokens: int = MIN_TOKENS, max_tokens: int = MAX_TOKENS) -> list[Document]:
    """Every usable document, in a fixed order; ``origin`` is its index."""
    texts: list[tuple[str, str]] = [(t, "news") for t in _news()]
    for label, items in _fortunes().items():
        texts += [(t, label) for t in items if len(t.split()) >= 25]
    room = max_tokens - 12  # for an appended reference or a greeting, so an edit is not truncated
    fitted = [(f, label) for t, label in texts if (f := _fit(t, tokenizer, min_tokens, room))]
    counts: dict[str, int] = {}
    for _, label in fitted:
        counts[label] = counts.get(label, 0) + 1
    kept = [(t, label) for t, label in dict.fromkeys(fitted) if counts[label] >= _MIN_PER_LABEL]
    return [Document(t, label, i) for i, (t, label) in enumerate(kept)]


def light_edit(text: str, rng: random.Random) -> tuple[str, str]:
    """One light edit, as a campaign's resends have: ``(kind, new text)``. Numbers are changed when the text has
    some; otherwise a reference id is appended or a greeting put in front."""
    kinds = ["reference", "greeting"] + (["numbers"] if re.search(r"\d", text) else [])
    kind = rng.choice(kinds)
    if kind == "numbers":
        new = re.sub(r"\d+", lambda m: str(rng.randrange(10 ** len(m.group()))).zfill(len(m.group())), text)
        return kind, new
    if kind == "reference":
        return kind, f"{text} Ref: {rng.choice('ABCDEFGH')}{rng.choice('KLMNPQR')}-{rng.randrange(10**5):05d}"
    return kind, f"{rng.choice(_GREETINGS)} {text}"


def natural_stream(docs: list[Document], n: int, seed: int = 0) -> list[Request]:
    """``n`` distinct documents in random order."""
    if n > len(docs):
        raise ValueError(f"natural stream: {n} requests asked, {len(docs)} distinct documents available.")
    rng = random.Random(seed)
    return [Request(d, d.text, None, False) for d in rng.sample(docs, n)]


def campaign_stream(docs: list[Document], n: int, pool: int = 300, seed: int = 0, s: float = 1.1) -> list[Request]:
    """``n`` requests drawn with Zipf(``s``) popularity from ``pool`` documents; half of the repeats edited."""
    rng = random.Random(seed)
    chosen = rng.sample(docs, pool)
    weights = 1.0 / np.arange(1, pool + 1) ** s
    picks = np.random.default_rng(seed).choice(pool, size=n, p=weights / weights.sum())
    seen, out = set(), []
    for pick in picks.tolist():
        doc = chosen[pick]
        if pick in seen and rng.random() < 0.5:
            kind, text = light_edit(doc.text, rng)
            out.append(Request(doc, text, kind, True))
        else:
            out.append(Request(doc, doc.text, None, pick in seen))
        seen.add(pick)
    return out


def batches(stream: list[Request], tokenizer, size: int = BATCH, max_tokens: int = MAX_TOKENS) -> list[dict]:
    """The stream as padded tokenizer batches of ``size`` requests."""
    return [
        tokenizer(
            [r.text for r in stream[i : i + size]],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_tokens,
        )
        for i in range(0, len(stream), size)
    ]
