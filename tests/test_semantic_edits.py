"""The default semantic config on one-word edits of real short texts (issue #33): a changed, dropped or inserted
word can reverse a text's meaning, so such a text is computed, never served the original's state.

Texts are sentences of 30-220 characters from the Lee news corpus (gensim's test data, real text installed offline:
``pip install gensim``), the lengths where the edit keeps the token overlap above the default threshold; the edit
changes, drops or inserts one word, drawn with a fixed seed.
"""

import importlib.util
import random
import re
from pathlib import Path

import pytest
import torch

from hf_layercache import LayerCacheConfig
from hf_layercache.strategies.semantic.alignment import ADDED, align_tokens, take

TEXTS = 60
"""Enough that ``edits="any"`` serves several of them below cosine 0.95 (about a fifth), few enough to stay fast."""
WORDS = ("not", "never", "only", "also", "again", "nearly")
"""Words an insertion draws from: small words that can change what a sentence says."""


def lee_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences of 30-220 characters and at least 5 words from the Lee news corpus."""
    spec = importlib.util.find_spec("gensim")  # located, not imported: only its data files are read
    data = Path(spec.submodule_search_locations[0]) / "test" / "test_data" if spec else None
    if data is None or not (data / "lee_background.cor").exists():
        pytest.skip("gensim's Lee corpus is missing: pip install gensim")
    sentences = []
    for line in (data / "lee_background.cor").read_text(encoding="latin-1").splitlines():
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(line.split())):
            if 30 <= len(sentence) <= 220 and len(sentence.split()) >= 5:
                sentences.append(sentence)
    return random.Random(seed).sample(list(dict.fromkeys(sentences)), count)


def one_word_edit(text: str, vocabulary: list[str], rng: random.Random) -> str:
    """``text`` with one word (not the first) changed to another word of the corpus, dropped, or preceded by a
    small word such as "not"."""
    words = text.split()
    i = rng.choice([i for i, w in enumerate(words) if i > 0 and w.isalpha() and len(w) > 2])
    kind = rng.choice(("change", "change", "drop", "insert"))
    if kind == "change":
        words[i] = rng.choice([v for v in vocabulary if v.lower() != words[i].lower()])
    elif kind == "drop":
        del words[i]
    else:
        words.insert(i, rng.choice(WORDS))
    return " ".join(words)


def test_additive_alignment_maps_tokens_added_at_the_ends_and_refuses_edits_inside():
    cls, sep = 101, 102
    old = [cls, 5, 6, 7, 8, sep]
    assert align_tokens([cls, 9, 5, 6, 7, 8, sep], old, 0.2, "additive").tolist() == [0, ADDED, 1, 2, 3, 4, 5]
    appended = align_tokens([cls, 5, 6, 7, 8, 9, 9, sep], old, 0.3, "additive")
    assert appended.tolist() == [0, 1, 2, 3, 4, ADDED, ADDED, 5]
    assert align_tokens([9, 5, 6, 7, 8], [5, 6, 7, 8], 0.25, "additive").tolist() == [ADDED, 0, 1, 2, 3]  # no [CLS]
    assert align_tokens(old, old, 0.0, "additive") == slice(None)
    for edited in (
        [cls, 5, 9, 7, 8, sep],  # a changed token of equal length: served position to position by "any"
        [cls, 5, 6, 9, 7, 8, sep],  # a token inserted inside
        [cls, 5, 7, 8, sep],  # a token dropped
    ):
        assert align_tokens(edited, old, 0.5, "additive") is None
        assert align_tokens(edited, old, 0.5, "any") is not None
    assert align_tokens([cls, 9, 9, 5, 6, 7, 8, sep], old, 0.2, "additive") is None  # more added than allowed


def test_added_tokens_take_the_mean_of_the_entrys_inner_tokens():
    value = torch.arange(12.0).reshape(6, 2)  # [CLS], four inner tokens, [SEP]
    index = torch.tensor([0, ADDED, 1, 2, 3, 4, ADDED, 5])
    served = take(value, index)
    torch.testing.assert_close(served[[0, 2, 3, 4, 5, 7]], value)
    torch.testing.assert_close(served[[1, 6]], value[1:5].mean(0).expand(2, 2))
    assert torch.equal(take(value, slice(None)), value)


def test_bad_edits_value_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"edits='some'.*'additive', 'any'"):
        LayerCacheConfig(strategy="semantic", edits="some")


@pytest.mark.slow
def test_sentence_transformers_one_word_edits_of_real_short_texts_are_computed(minilm_path):
    """Through sentence-transformers as a user loads it, with the default config: after the originals, their
    one-word edits are never served below cosine 0.95 of their uncached embeddings (they compute), while resent
    originals and a greeting put in front of one are served. ``edits="any"``, the behaviour before, serves edits
    far below 0.95: the texts and edits are ones where the old default failed."""
    from sentence_transformers import SentenceTransformer

    originals = lee_sentences(TEXTS)
    vocabulary = sorted({w for t in originals for w in t.split() if w.isalpha() and len(w) > 2})
    rng = random.Random(1)
    edits = [one_word_edit(text, vocabulary, rng) for text in originals]
    greeted = [f"Hello, {text}" for text in originals if len(text) > 180]
    plain = SentenceTransformer(minilm_path, device="cpu")
    truth = plain.encode(edits, convert_to_tensor=True)
    greeted_truth = plain.encode(greeted, convert_to_tensor=True)
    lowest, served = {}, {}
    for edit_rule in ("additive", "any"):
        config = LayerCacheConfig(strategy="semantic", edits=edit_rule)
        cached = SentenceTransformer(minilm_path, device="cpu", model_kwargs={"layer_cache": config})
        cached.encode(originals)
        total = cached[0].auto_model.layer_cache.stats
        before = total()["total"]["hits"]
        lowest[edit_rule] = float(torch.cosine_similarity(cached.encode(edits, convert_to_tensor=True), truth).min())
        served[edit_rule] = total()["total"]["hits"] - before
        if edit_rule == "additive":
            assert served[edit_rule] == 0
            greeted_served = cached.encode(greeted, convert_to_tensor=True)
            assert total()["total"]["hits"] > before  # the cache is in use: a greeting in front is served
            assert float(torch.cosine_similarity(greeted_served, greeted_truth).min()) > 0.9
            before = total()["total"]["hits"]
            cached.encode(originals)
            assert total()["total"]["hits"] - before >= TEXTS  # resent originals are served
    assert lowest["additive"] >= 0.95
    assert served["any"] > 0 and lowest["any"] < 0.95
