"""Error-bounded semantic reuse (``max_error_rate``): the bound itself, and the strategy that obeys it."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import VOCAB, tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.persistence import LayerCacheFileError, file_digest
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
    return LayerCacheConfig(strategy="semantic", **{"max_error_rate": 0.05, "verify_fraction": 0.0, **kwargs})


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
    bound, entry = ErrorBound(0.01), {OBSERVATIONS: new_observations()}
    assert bound.exploration_probability("layer", 0, entry, 0.99) == 1.0  # nothing known yet
    rng = np.random.default_rng(2)
    for similarity in rng.uniform(0.5, 1.0, 3000):
        bound.observe("layer", {}, float(similarity), bool(similarity > 0.8))
    assert bound.exploration_probability("layer", 0, entry, 0.99) == 0.0
    assert bound.exploration_probability("layer", 0, entry, 0.7) > 0.95
    for _ in range(CAPACITY):  # this entry was unacceptable even at 0.99: it alone gets stricter
        bound.observe("layer", entry, 0.99, False)
    assert bound.exploration_probability("layer", 0, entry, 0.99) > 0.9
    assert bound.exploration_probability("layer", 1, {OBSERVATIONS: new_observations()}, 0.99) == 0.0


# --- the strategy --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reuse", ["state", "residual"])
def test_repeated_input_explores_first_then_serves_the_same_result(reuse):
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    reference = run(tiny_model("bert"), batch)
    hf_layercache.enable(model, bounded(reuse=reuse))
    for _ in range(MIN_OBSERVATIONS + 1):  # identical requests: explored, judged acceptable (cosine 1)
        torch.testing.assert_close(run(model, batch), reference, rtol=0, atol=1e-5)
    total = model.layer_cache.stats()["total"]
    assert total["explored"] >= MIN_OBSERVATIONS and total["hits"] == 0
    hits_before = total["hits"]
    for _ in range(30):
        torch.testing.assert_close(run(model, batch), reference, rtol=0, atol=1e-5)
    assert model.layer_cache.stats()["total"]["hits"] > hits_before


def test_never_serves_what_was_always_unacceptable():
    """acceptance_cosine=1: a changed token is never acceptable, so after any amount of learning nothing is served
    and every output is the computed one."""
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(model, bounded(acceptance_cosine=1.0))
    uncached = tiny_model("bert")
    for i in range(40):  # every request differs from every earlier one
        changed = one_token_changed(batch, i)
        torch.testing.assert_close(run(model, changed), run(uncached, changed), rtol=0, atol=1e-5)
    total = model.layer_cache.stats()["total"]
    assert total["hits"] == 0 and total["explored"] > MIN_OBSERVATIONS


def test_observations_survive_save_and_load(tmp_path):
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(model, bounded())
    for _ in range(MIN_OBSERVATIONS + 5):
        run(model, batch)
    strategy = model.layer_cache.strategy
    name = list(strategy.banks)[-1]  # state reuse is served, so judged, at the deepest layer
    bank = strategy.banks[name]
    observed = sum(int(v[OBSERVATIONS][0]) for v in bank.values())
    assert observed >= MIN_OBSERVATIONS
    entry_id = max(bank._entries)
    tau = strategy.error_bound.exploration_probability(name, entry_id, bank.get(entry_id), 0.999)
    model.layer_cache.save(tmp_path)

    warm = tiny_model("bert")
    hf_layercache.enable(warm, bounded())
    warm.layer_cache.load(tmp_path)
    warm_strategy = warm.layer_cache.strategy
    warm_bank = warm_strategy.banks[name]
    assert sum(int(v[OBSERVATIONS][0]) for v in warm_bank.values()) == observed
    assert warm_strategy.error_bound.exploration_probability(name, entry_id, warm_bank.get(entry_id), 0.999) == tau


def test_malformed_observations_in_a_warm_cache_are_refused_and_the_banks_kept(tmp_path):
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(model, bounded())
    run(model, batch)
    model.layer_cache.save(tmp_path)
    shard = tmp_path / "layer_cache.safetensors"
    tensors = load_file(shard)
    name = sorted(n for n in tensors if n.endswith(OBSERVATIONS))[-1]  # in the last bank checked
    tensors[name] = torch.zeros(5, dtype=torch.long)
    save_file(tensors, shard)
    header = json.loads((tmp_path / "layer_cache_config.json").read_text())
    header["files"]["layer_cache.safetensors"] = file_digest(shard)  # a well-formed file with bad content
    (tmp_path / "layer_cache_config.json").write_text(json.dumps(header))
    warm = tiny_model("bert")
    hf_layercache.enable(warm, bounded())
    run(warm, one_token_changed(batch, 0))
    entries = warm.layer_cache.stats()["total"]["entries"]
    with pytest.raises(LayerCacheFileError, match=f"{OBSERVATIONS}.*shape"):
        warm.layer_cache.load(tmp_path)
    assert warm.layer_cache.stats()["total"]["entries"] == entries  # nothing was replaced


def test_audits_report_the_observed_error_rate():
    """verify_fraction=1 audits every would-be hit: identical inputs are acceptable, changed ones (at
    acceptance_cosine=1) are not, and stats() says so."""
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(
        model, LayerCacheConfig(strategy="semantic", threshold=0.0, verify_fraction=1.0, acceptance_cosine=1.0)
    )
    run(model, batch)
    run(model, batch)
    assert model.layer_cache.stats()["total"]["observed_error_rate"] == 0.0
    run(model, one_token_changed(batch, 0))
    total = model.layer_cache.stats()["total"]
    assert total["audited"] == 2 and total["observed_error_rate"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "exact", "max_error_rate": 0.01}, "strategy='semantic' only"),
        ({"strategy": "semantic", "max_error_rate": 0.0}, "max_error_rate"),
        ({"strategy": "semantic", "max_error_rate": 1.0}, "max_error_rate"),
        ({"strategy": "semantic", "acceptance_cosine": 1.5}, "acceptance_cosine"),
    ],
)
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerCacheConfig(**kwargs)
