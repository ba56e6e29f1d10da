"""calibrate() on the real all-MiniLM-L6-v2 with a handful of sentences: thresholds per layer, progress, validation."""

import pytest
import transformers as tf

import hf_layercache
from hf_layercache import LayerCacheConfig

pytestmark = pytest.mark.slow

BASES = [
    "The committee approved the new budget for the public schools",
    "A small dog slept under the kitchen table all afternoon",
    "Prices of fresh vegetables rose sharply after the storm",
    "She plays the violin in the city orchestra every weekend",
    "The old bridge was closed for repairs during the long winter",
    "Engineers tested the new engine in the cold mountain air for three weeks",
    "The library will open two hours later than usual on public holidays",
]
TEXTS = [text for base in BASES for text in (base, base + ".")]
"""Near-duplicates the default semantic config serves: one token added at the end (``edits="additive"``)."""


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return tf.AutoModel.from_pretrained(minilm_path).eval(), tf.AutoTokenizer.from_pretrained(minilm_path)


@pytest.mark.parametrize("reuse", ["residual", "state"])
def test_returns_a_semantic_config_with_one_threshold_per_layer(minilm, reuse, capfd):
    model, tokenizer = minilm
    with pytest.warns(UserWarning, match=r"strategy='exact'\) does not read backend='exact'"):
        base = LayerCacheConfig(strategy="exact", reuse=reuse, backend="exact", max_entries=500)  # made semantic
    config = hf_layercache.calibrate(model, TEXTS, target=0.9, tokenizer=tokenizer, config=base)
    assert config.strategy == "semantic" and config.reuse == reuse and config.max_entries == 500
    assert len(config.threshold) == 6 and all(-1.0 <= t <= 1.0 for t in config.threshold)
    assert any(t < 1.0 for t in config.threshold)  # the near-duplicates make some layer usable
    assert "calibration forward passes" in capfd.readouterr().err  # the progress bar
    cached = tf.AutoModel.from_pretrained(model.name_or_path, layer_cache=config).eval()
    assert cached.layer_cache.config.threshold == config.threshold


def test_a_stricter_target_never_lowers_a_threshold(minilm):
    model, tokenizer = minilm
    loose = hf_layercache.calibrate(model, TEXTS, target=0.8, tokenizer=tokenizer, progress=False)
    strict = hf_layercache.calibrate(model, TEXTS, target=0.99999, tokenizer=tokenizer, progress=False)
    assert all(s >= lo for s, lo in zip(strict.threshold, loose.threshold, strict=True))


def test_the_attached_cache_is_bypassed_and_untouched(minilm):
    model, tokenizer = minilm
    cached = tf.AutoModel.from_pretrained(model.name_or_path, layer_cache=LayerCacheConfig(strategy="semantic"))
    hf_layercache.calibrate(cached.eval(), TEXTS[:4], tokenizer=tokenizer, progress=False)
    assert cached.layer_cache.stats()["total"]["entries"] == 0
    assert cached.layer_cache.stats()["total"]["lookups"] == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"target": 1.5}, "target"), ({"target": 0}, "target"), ({"quantile": 0.0}, "quantile")],
)
def test_bad_arguments_are_value_errors(minilm, kwargs, match):
    model, tokenizer = minilm
    with pytest.raises(ValueError, match=match):
        hf_layercache.calibrate(model, TEXTS, tokenizer=tokenizer, **kwargs)
    with pytest.raises(ValueError, match="two"):
        hf_layercache.calibrate(model, TEXTS[:1], tokenizer=tokenizer)


def test_errors_are_measured_end_to_end(minilm):
    """An identical pair reused at any layer changes nothing; the thresholds of a perfect target then serve only
    inputs whose keys are as close as identical ones."""
    model, tokenizer = minilm
    config = hf_layercache.calibrate(model, TEXTS + TEXTS[:1], target=1.0, tokenizer=tokenizer, progress=False)
    assert all(t >= 0.999 for t in config.threshold)


SUBSTITUTIONS = [
    "The committee approved the new budget for the public schools.",
    "The committee rejected the new budget for the public schools.",
    "A small dog slept under the kitchen table all afternoon.",
    "A small cat slept under the kitchen table all afternoon.",
    "Prices of fresh vegetables rose sharply after the storm.",
    "Prices of fresh vegetables fell sharply after the storm.",
]


def test_calibration_pairs_only_what_the_configs_edits_would_serve(minilm):
    """One-word substitutions are served by ``edits="any"`` but computed by the default ``"additive"``: calibrating
    on them finds usable layers only for the config that would serve them."""
    model, tokenizer = minilm
    for edits, usable in (("any", True), ("additive", False)):
        base = LayerCacheConfig(strategy="semantic", edits=edits)
        config = hf_layercache.calibrate(
            model, SUBSTITUTIONS, target=0.8, tokenizer=tokenizer, config=base, progress=False
        )
        assert any(t < 1.0 for t in config.threshold) == usable, (edits, config.threshold)
