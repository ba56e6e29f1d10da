"""Warm caches on disk: round trips, refusal of foreign or damaged caches, sharding, atomic writes."""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig, LayerCacheFileError


def run(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.fixture
def warm_dir(tmp_path):
    model = tiny_model("bert")
    hf_layercache.enable(model)
    batch = tiny_batch("bert")
    reference = run(model, batch)
    model.save_pretrained(tmp_path)
    return tmp_path, batch, reference


def test_save_pretrained_writes_the_fixed_files(warm_dir):
    directory, _, _ = warm_dir
    names = sorted(p.name for p in directory.iterdir())
    assert "layer_cache.safetensors" in names and "layer_cache_config.json" in names
    assert not [n for n in names if n.endswith(".tmp")]
    header = json.loads((directory / "layer_cache_config.json").read_text())
    assert header["format_version"] == 1
    assert header["config"]["strategy"] == "exact"
    assert header["model"]["model_type"] == "bert" and header["model"]["num_layers"] == 3
    assert header["banks"]["encoder.layer"]["entries"] == 3


def test_from_pretrained_restores_the_warm_cache_and_the_first_request_hits(warm_dir):
    directory, batch, reference = warm_dir
    warm = tf.AutoModel.from_pretrained(directory)
    assert torch.equal(run(warm, batch), reference)
    stats = warm.layer_cache.stats()["total"]
    assert stats["misses"] == 0 and stats["hits"] == 3 * 3


def test_controller_save_and_load_alone(tmp_path):
    model = tiny_model("llama", tf.AutoModelForCausalLM)
    hf_layercache.enable(model)
    batch = tiny_batch("llama", padding="left")
    tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
    model.layer_cache.save(tmp_path)
    other = hf_layercache.enable(tiny_model("llama", tf.AutoModelForCausalLM))
    other.layer_cache.load(tmp_path)
    assert torch.equal(other.generate(**batch, max_new_tokens=4, do_sample=False), tokens)
    assert other.layer_cache.stats()["total"]["hits"] == 3 * 3


def test_a_cache_of_other_weights_is_refused_with_what_differs(warm_dir):
    directory, _, _ = warm_dir
    other = hf_layercache.enable(tiny_model("bert", seed=1))
    with pytest.raises(LayerCacheFileError, match="weights_hash"):
        other.layer_cache.load(directory)
    assert len(other.layer_cache.banks["encoder.layer"]) == 0


def test_a_cache_of_another_architecture_is_refused(warm_dir):
    directory, _, _ = warm_dir
    other = hf_layercache.enable(tiny_model("roberta"))
    with pytest.raises(LayerCacheFileError, match="model_type: cache has 'bert', model has 'roberta'"):
        other.layer_cache.load(directory)


def test_a_truncated_shard_is_a_clear_error(warm_dir):
    directory, _, _ = warm_dir
    shard = directory / "layer_cache.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    model = hf_layercache.enable(tiny_model("bert"))
    with pytest.raises(LayerCacheFileError, match=r"Cannot read layer cache shard .*layer_cache\.safetensors"):
        model.layer_cache.load(directory)


def test_garbage_config_json_is_a_clear_error(warm_dir):
    directory, _, _ = warm_dir
    (directory / "layer_cache_config.json").write_text("{not json")
    model = hf_layercache.enable(tiny_model("bert"))
    with pytest.raises(LayerCacheFileError, match="Cannot read"):
        model.layer_cache.load(directory)


def test_large_caches_are_sharded_with_an_index(tmp_path):
    model = hf_layercache.enable(tiny_model("bert"))
    batch = tiny_batch("bert", batch=6)
    reference = run(model, batch)
    model.layer_cache.save(tmp_path, max_shard_size=4000)
    shards = sorted(p.name for p in tmp_path.glob("layer_cache-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"layer_cache-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "layer_cache.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    warm = hf_layercache.enable(tiny_model("bert"))
    warm.layer_cache.load(tmp_path)
    assert torch.equal(run(warm, batch), reference)
    # saving again unsharded removes the stale shards and index
    model.layer_cache.save(tmp_path)
    assert not list(tmp_path.glob("layer_cache-*")) and not (tmp_path / "layer_cache.safetensors.index.json").exists()


def test_an_index_pointing_outside_the_directory_is_refused(tmp_path):
    model = hf_layercache.enable(tiny_model("bert"))
    run(model, tiny_batch("bert", batch=6))
    model.layer_cache.save(tmp_path, max_shard_size=1000)
    index_path = tmp_path / "layer_cache.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    with pytest.raises(LayerCacheFileError, match="refusing to read them"):
        model.layer_cache.load(tmp_path)


def test_wrong_shapes_and_unknown_tensors_are_refused(warm_dir):
    directory, _, _ = warm_dir
    model = hf_layercache.enable(tiny_model("bert"))
    good = {
        "ids": torch.tensor([0]),
        "digests": torch.zeros(1, 32, dtype=torch.uint8),
        "has_digest": torch.ones(1, dtype=torch.bool),
    }
    cases = {
        "hidden": {**good, "entry.0.hidden": torch.zeros(7, 31)},
        "unexpected tensor": {**good, "entry.9.hidden": torch.zeros(7, 32)},
        "'ids' must be": {**good, "ids": torch.tensor([0.5])},
    }
    for message, state in cases.items():
        save_file({f"encoder.layer/{k}": v for k, v in state.items()}, directory / "layer_cache.safetensors")
        with pytest.raises(LayerCacheFileError, match=message):
            model.layer_cache.load(directory)


def test_unknown_config_keys_warn_but_load(warm_dir):
    directory, batch, reference = warm_dir
    path = directory / "layer_cache_config.json"
    header = json.loads(path.read_text())
    header["config"]["from_the_future"] = 1
    path.write_text(json.dumps(header))
    with pytest.warns(UserWarning, match="from_the_future"):
        warm = tf.AutoModel.from_pretrained(directory)
    assert torch.equal(run(warm, batch), reference)


def test_an_explicit_config_of_another_strategy_starts_cold(warm_dir):
    directory, _, _ = warm_dir

    class Other(hf_layercache.strategies.ExactStrategy):
        pass

    hf_layercache.register_strategy("exact-copy", Other)
    with pytest.warns(UserWarning, match="starting cold"):
        model = tf.AutoModel.from_pretrained(directory, layer_cache=LayerCacheConfig(strategy="exact-copy"))
    assert model.layer_cache.stats()["total"]["entries"] == 0
