"""Warm caches on disk: round trips, refusal of foreign or damaged caches, sharding, atomic writes."""

import json
import warnings

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig, LayerCacheFileError
from hf_layercache.persistence import file_digest


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
    assert header["format_version"] == hf_layercache.persistence.FORMAT_VERSION == 5
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


def test_a_truncated_or_flipped_shard_is_a_clear_error(warm_dir):
    directory, _, _ = warm_dir
    shard = directory / "layer_cache.safetensors"
    original = shard.read_bytes()
    model = hf_layercache.enable(tiny_model("bert"))
    for damaged in (original[: len(original) // 2], original[:-1] + bytes([original[-1] ^ 1])):
        shard.write_bytes(damaged)
        with pytest.raises(LayerCacheFileError, match=r"layer_cache\.safetensors does not match the digest"):
            model.layer_cache.load(directory)
    assert len(model.layer_cache.banks["encoder.layer"]) == 0


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
        "namespaces": torch.zeros(1, dtype=torch.long),
    }
    cases = {
        "hidden": {**good, "entry.0.hidden": torch.zeros(7, 31)},
        "unexpected tensor": {**good, "entry.9.hidden": torch.zeros(7, 32)},
        "'ids' must be": {**good, "ids": torch.tensor([0.5])},
    }
    config_path = directory / "layer_cache_config.json"
    for message, state in cases.items():
        shard = directory / "layer_cache.safetensors"
        save_file({f"encoder.layer/{k}": v for k, v in state.items()}, shard)
        header = json.loads(config_path.read_text())
        header["files"]["layer_cache.safetensors"] = file_digest(shard)  # a well-formed file with bad content
        config_path.write_text(json.dumps(header))
        with pytest.raises(LayerCacheFileError, match=message):
            model.layer_cache.load(directory)


@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_an_interrupted_save_leaves_the_previous_cache_loadable(tmp_path, monkeypatch, fail_at):
    model = hf_layercache.enable(tiny_model("bert"))
    old_batch, new_batch = tiny_batch("bert", seed=1), tiny_batch("bert", batch=6, seed=2)
    reference = run(model, old_batch)
    model.layer_cache.save(tmp_path, max_shard_size=1000)
    run(model, new_batch)
    real_replace, calls = hf_layercache.persistence.os.replace, []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) > fail_at and not str(dst).endswith(".layer_cache_previous"):
            raise KeyboardInterrupt("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(hf_layercache.persistence.os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        model.layer_cache.save(tmp_path, max_shard_size=1000)
    monkeypatch.setattr(hf_layercache.persistence.os, "replace", real_replace)

    warm = hf_layercache.enable(tiny_model("bert"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm.layer_cache.load(tmp_path)
    assert torch.equal(run(warm, old_batch), reference)
    assert warm.layer_cache.stats()["total"]["misses"] == 0
    # the next complete save cleans up: one consistent set, no snapshot, no temporary files
    model.layer_cache.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_cache.safetensors", "layer_cache_config.json"]


def test_unknown_config_keys_warn_but_load(warm_dir):
    directory, batch, reference = warm_dir
    path = directory / "layer_cache_config.json"
    header = json.loads(path.read_text())
    header["config"]["from_the_future"] = 1
    path.write_text(json.dumps(header))
    with pytest.warns(UserWarning, match="from_the_future"):
        warm = tf.AutoModel.from_pretrained(directory)
    assert torch.equal(run(warm, batch), reference)


def test_an_explicit_config_of_another_strategy_starts_cold(warm_dir, monkeypatch):
    directory, _, _ = warm_dir

    class Other(hf_layercache.get_strategy("exact")):
        pass

    # registered through the public call, removed after the test (the registry has no unregister)
    monkeypatch.setattr(hf_layercache.registry.STRATEGIES, "_classes", dict(hf_layercache.registry.STRATEGIES._classes))
    hf_layercache.register_strategy("exact-copy", Other)
    with pytest.warns(UserWarning, match="starting cold"):
        model = tf.AutoModel.from_pretrained(directory, layer_cache=LayerCacheConfig(strategy="exact-copy"))
    assert model.layer_cache.stats()["total"]["entries"] == 0


def test_tensors_sharing_memory_are_written_apart(tmp_path):
    """Entries may share one tensor in memory (the attention strategy's layers keep one mask per request);
    safetensors refuses shared storage, so the writer copies the repeats."""
    from safetensors.torch import load_file

    from hf_layercache.persistence import write_cache

    mask = torch.tensor([[True, False, True]])
    values = torch.arange(6.0)
    tensors = {"a/mask": mask, "b/mask": mask, "c/half": values[:3], "d/half": values[3:]}
    (path,) = [p for p in write_cache(tmp_path, {"format_version": 5}, tensors) if p.suffix == ".safetensors"]
    loaded = load_file(path)
    assert all(torch.equal(loaded[name], t) for name, t in tensors.items())
