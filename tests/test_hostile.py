"""Hostile warm-cache files and inputs (issue #16): each is refused with a clear error, or cut to what the config
allows, and nothing is served from it."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig, LayerCacheFileError
from hf_layercache.persistence import file_digest


def run(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.fixture
def saved(tmp_path):
    """A warm exact cache of 3 entries (one per row) of a tiny BERT."""
    model = hf_layercache.enable(tiny_model("bert"))
    batch = tiny_batch("bert")
    run(model, batch)
    model.layer_cache.save(tmp_path)
    return tmp_path, batch


def rewrite(directory, change) -> None:
    """Apply ``change`` to the saved tensors and re-sign the shard's digest, as an attacker editing the file would."""
    shard = directory / "layer_cache.safetensors"
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard)
    header = json.loads((directory / "layer_cache_config.json").read_text())
    header["files"]["layer_cache.safetensors"] = file_digest(shard)
    (directory / "layer_cache_config.json").write_text(json.dumps(header))


def test_a_cache_saved_under_a_larger_budget_is_cut_to_this_one_by_the_policy(saved):
    directory, batch = saved
    small = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(max_entries=1))
    small.layer_cache.load(directory)
    assert small.layer_cache.stats()["banks"]["encoder.layer"]["entries"] == 1
    tight = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(max_memory=3000))
    tight.layer_cache.load(directory)
    assert all(bank.nbytes <= bank.max_bytes for bank in tight.layer_cache.banks.values())
    run(tight, batch)  # still serves and stores within its budget
    assert all(bank.nbytes <= bank.max_bytes for bank in tight.layer_cache.banks.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update({k: v[:0] for k, v in t.items() if k.startswith("encoder.layer/policy.")}), "policy state"),
        (lambda t: t.update({"encoder.layer/ids": t["encoder.layer/ids"] + 2**62}), "'ids' must be distinct"),
        (lambda t: t["encoder.layer/entry.0.hidden"].fill_(float("nan")), "NaN or infinite"),
        (lambda t: t["encoder.layer/entry.1.hidden"].__setitem__((0, 0), float("inf")), "NaN or infinite"),
    ],
)
def test_poisoned_or_crafted_state_is_refused_and_the_banks_kept(saved, change, message):
    directory, batch = saved
    rewrite(directory, change)
    model = hf_layercache.enable(tiny_model("bert"))
    run(model, batch)
    before = model.layer_cache.stats()["total"]["entries"]
    with pytest.raises(LayerCacheFileError, match=message):
        model.layer_cache.load(directory)
    assert model.layer_cache.stats()["total"]["entries"] == before  # nothing lost
    reference = run(tiny_model("bert"), batch)
    assert torch.equal(run(model, batch), reference)


def test_a_symlinked_shard_is_refused(saved, tmp_path_factory):
    directory, _ = saved
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "layer_cache.safetensors"
    (directory / "layer_cache.safetensors").rename(elsewhere)
    (directory / "layer_cache.safetensors").symlink_to(elsewhere)
    with pytest.raises(LayerCacheFileError, match="symbolic link"):
        hf_layercache.enable(tiny_model("bert")).layer_cache.load(directory)


def test_a_config_nested_too_deeply_is_a_file_error_not_a_recursion_error(saved):
    directory, _ = saved
    (directory / "layer_cache_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LayerCacheFileError, match="nested too deeply"):
        hf_layercache.enable(tiny_model("bert")).layer_cache.load(directory)
    with pytest.raises(ValueError, match="nested too deeply"):
        LayerCacheConfig.from_json_file(directory / "layer_cache_config.json")


def test_an_enormous_memory_budget_is_a_value_error_not_an_overflow():
    with pytest.raises(ValueError, match="max_memory"):
        LayerCacheConfig(max_memory="9" * 400 + "GB")


# --- integrity_key: signed caches ------------------------------------------------------------------------------------
SECRET = "correct horse battery staple"


@pytest.fixture
def signed(tmp_path):
    """A warm exact cache of a tiny BERT, saved with an integrity key."""
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(integrity_key=SECRET))
    batch = tiny_batch("bert")
    reference = run(model, batch)
    model.layer_cache.save(tmp_path)
    return tmp_path, batch, reference


def test_a_signed_cache_loads_with_its_key_and_the_secret_is_in_no_file(signed, monkeypatch):
    directory, batch, reference = signed
    assert all(SECRET.encode() not in path.read_bytes() for path in directory.iterdir())
    warm = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(integrity_key=SECRET))
    warm.layer_cache.load(directory)
    assert torch.equal(run(warm, batch), reference)
    assert warm.layer_cache.stats()["total"]["misses"] == 0
    monkeypatch.setenv(hf_layercache.integrity.ENV_VAR, SECRET)  # the key from the environment
    hf_layercache.enable(tiny_model("bert")).layer_cache.load(directory)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("edit a tensor and recompute its digest", "does not match its content"),
        ("load with another key", "does not match its content"),
        ("strip the signature", "not signed"),
    ],
)
def test_a_key_refuses_altered_unsigned_or_foreign_caches_and_keeps_the_banks(signed, tamper, message):
    directory, batch, reference = signed
    key = SECRET
    if tamper.startswith("edit"):
        rewrite(directory, lambda t: t["encoder.layer/entry.0.hidden"].fill_(0.5))
    elif tamper.startswith("load"):
        key = "another secret"
    else:
        path = directory / "layer_cache_config.json"
        header = json.loads(path.read_text())
        del header["signature"]
        path.write_text(json.dumps(header))
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(integrity_key=key))
    run(model, batch)
    before = model.layer_cache.stats()["total"]["entries"]
    with pytest.raises(hf_layercache.LayerCacheIntegrityError, match=message):
        model.layer_cache.load(directory)
    assert model.layer_cache.stats()["total"]["entries"] == before  # its own entries, untouched
    assert torch.equal(run(model, batch), reference)


def test_from_pretrained_refuses_an_unsigned_warm_cache_when_a_key_is_set(saved, monkeypatch):
    directory, _ = saved
    tiny_model("bert").save_pretrained(directory)  # the weights the cache was filled with: same seed
    monkeypatch.setenv(hf_layercache.integrity.ENV_VAR, SECRET)
    with pytest.raises(hf_layercache.LayerCacheIntegrityError, match="not signed"):
        transformers.AutoModel.from_pretrained(directory)


def test_a_cache_far_larger_than_the_budget_loads_only_the_entries_the_policy_keeps(tmp_path, monkeypatch):
    """Memory amplification (#16 item 4): 1,000 saved entries into max_entries=10 read only the 10 kept entries'
    tensors (the most recently used, for LRU), and the bookkeeping of the other 990 never reaches the bank."""
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(max_entries=2000))
    many, recent = tiny_batch("bert", batch=1000, seed=3), tiny_batch("bert", batch=10, seed=4)
    run(model, many)
    expected = run(model, recent)  # the 10 most recently used
    model.layer_cache.save(tmp_path)
    reads = []
    real_read = hf_layercache.shards.ShardTensors.__getitem__
    monkeypatch.setattr(
        hf_layercache.shards.ShardTensors,
        "__getitem__",
        lambda self, name: reads.append(name) or real_read(self, name),
    )
    small = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(max_entries=10))
    small.layer_cache.load(tmp_path)
    entry_reads = {name.split(".")[2] for name in reads if name.startswith("encoder.layer/entry.")}
    assert len(entry_reads) == 10  # of 1,000 entries, only the kept ones were read
    assert small.layer_cache.banks["encoder.layer"].namespace_counts() == {
        hf_layercache.request.namespace_tag("default"): 10
    }
    assert torch.equal(run(small, recent), expected)
    assert small.layer_cache.stats()["total"]["misses"] == 0


def test_verify_fraction_catches_a_poisoned_exact_entry_in_use_and_replaces_it(saved):
    """#16 item 1: a well-formed poisoned entry (an attacker's constant, digests recomputed) in an unsigned cache is
    served by default; with ``verify_fraction`` the hits drawn are computed anyway, and an entry that disagrees is
    dropped, replaced by the computed output, counted and warned about."""
    directory, batch = saved
    rewrite(directory, lambda t: t["encoder.layer/entry.0.hidden"].fill_(0.5))
    reference = run(tiny_model("bert"), batch)

    trusting = hf_layercache.enable(tiny_model("bert"))
    trusting.layer_cache.load(directory)
    assert not torch.equal(run(trusting, batch), reference)  # what the default serves from a poisoned file
    assert trusting.layer_cache.stats()["total"]["verified"] == 0  # lossless strategies verify nothing by default

    checking = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(verify_fraction=1.0))
    checking.layer_cache.load(directory)
    with pytest.warns(UserWarning, match="disagrees with the layer"):
        assert torch.equal(run(checking, batch), reference)
    layer = checking.layer_cache.stats()["layers"][checking.layer_cache.layers[-1].name]
    assert layer["audited"] == 3 and layer["audited_unacceptable"] == 1  # the poisoned row, not the other two
    checking.layer_cache.config.verify_fraction = 0.0
    assert torch.equal(run(checking, batch), reference)  # the replaced entry now serves the truth
