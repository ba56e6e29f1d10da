"""Transformers glue: from_pretrained, device maps with offload, pipelines, install/uninstall, layer discovery."""

import json

import pytest
import torch
import transformers as tf
from tiny import CONFIGS, tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig

TOKENIZER_VOCAB = 30522


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return tf.AutoTokenizer.from_pretrained(minilm_path)


def saved_model(tmp_path, arch, head, tokenizer=None, **overrides):
    config = CONFIGS[arch].__class__(**{**CONFIGS[arch].to_dict(), **overrides})
    torch.manual_seed(0)
    model = head(config).eval()
    model.save_pretrained(tmp_path)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("cls", [tf.AutoModel, tf.BertModel, tf.AutoModelForSequenceClassification, tf.BertForMaskedLM])
def test_from_pretrained_takes_layer_cache_for_auto_and_concrete_classes(tmp_path, cls):
    path = saved_model(tmp_path, "bert", tf.BertModel)
    model = cls.from_pretrained(path, layer_cache={"strategy": "exact", "max_entries": 5}).eval()
    assert model.layer_cache.config.max_entries == 5
    batch = tiny_batch("bert")
    with torch.no_grad():
        first, second = model(**batch), model(**batch)
    key = "last_hidden_state" if "last_hidden_state" in first else "logits"
    assert torch.equal(first[key], second[key])
    assert model.layer_cache.stats()["total"]["hits"] == 3 * 3


def test_a_misspelt_key_in_a_dict_config_is_an_error_not_a_cache_without_its_limit(tmp_path):
    path = saved_model(tmp_path, "bert", tf.BertModel)
    with pytest.raises(ValueError, match="'max_memroy' \\(did you mean 'max_memory'\\?\\)"):
        tf.BertModel.from_pretrained(path, layer_cache={"max_memroy": "1GB"})
    with pytest.raises(ValueError, match="did you mean 'max_memory'"):  # refused before the model is even looked for
        tf.BertModel.from_pretrained(tmp_path / "no-such-model", layer_cache={"max_memroy": "1GB"})
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="did you mean 'max_memory'"):
        hf_layercache.enable(model, {"strategy": "exact", "max_memroy": "1GB"})
    assert not hasattr(model, "layer_cache")


def test_an_unknown_key_in_a_saved_warm_cache_warns_and_the_cache_still_loads(tmp_path, tokenizer):
    path = saved_model(tmp_path / "m", "bert", tf.BertModel, vocab_size=TOKENIZER_VOCAB)
    model = tf.AutoModel.from_pretrained(path, layer_cache={"strategy": "exact"}).eval()
    batch = tokenizer(["a saved request"], return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    model.save_pretrained(tmp_path / "warm")
    header_path = tmp_path / "warm" / "layer_cache_config.json"
    header = json.loads(header_path.read_text())
    header["config"]["field_of_a_newer_version"] = 1
    header_path.write_text(json.dumps(header))
    with pytest.warns(UserWarning, match="Ignoring unknown layer cache config key 'field_of_a_newer_version'"):
        warm = tf.AutoModel.from_pretrained(tmp_path / "warm").eval()
    assert warm.layer_cache.stats()["total"]["entries"] == 1


@pytest.mark.parametrize("explicit", [False, True])
def test_a_warm_cache_of_another_format_version_starts_cold_and_the_model_loads(tmp_path, tokenizer, explicit):
    path = saved_model(tmp_path / "m", "bert", tf.BertModel, vocab_size=TOKENIZER_VOCAB)
    model = tf.AutoModel.from_pretrained(path, layer_cache={"strategy": "exact", "max_entries": 5}).eval()
    with torch.no_grad():
        model(**tokenizer(["a saved request"], return_tensors="pt"))
    model.save_pretrained(tmp_path / "warm")
    header_path = tmp_path / "warm" / "layer_cache_config.json"
    header = json.loads(header_path.read_text())
    header["format_version"] = 1  # what the release before the tenant moved to the bank wrote
    header_path.write_text(json.dumps(header))
    layer_cache = {"strategy": "exact", "max_entries": 5} if explicit else None
    with pytest.warns(UserWarning, match="format_version 1; this hf_layercache reads .* starting cold"):
        warm = tf.AutoModel.from_pretrained(tmp_path / "warm", layer_cache=layer_cache).eval()
    assert warm.layer_cache.config.max_entries == 5 and warm.layer_cache.stats()["total"]["entries"] == 0
    with pytest.raises(hf_layercache.LayerCacheMismatchError, match="format_version 1"):
        warm.layer_cache.load(tmp_path / "warm")


def test_device_map_with_disk_offload_never_loads_weights_on_a_hit(tmp_path):
    path = saved_model(tmp_path / "m", "bert", tf.BertModel, hidden_size=128, intermediate_size=512)
    model = tf.AutoModel.from_pretrained(
        path,
        layer_cache=LayerCacheConfig(),
        device_map="auto",
        max_memory={"cpu": 600_000},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    assert "disk" in set(model.hf_device_map.values())
    loads = []
    for layer in model.layer_cache.layers:
        for module in layer.module.modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is not None:
                original = hook.pre_forward
                hook.pre_forward = lambda m, *a, _o=original, **k: loads.append(m) or _o(m, *a, **k)
    assert model.layer_cache.banks["encoder.layer"].device == model.layer_cache.layers[-1].device
    batch = tiny_batch("bert")
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        assert loads, "the first (missing) request must load the offloaded layer weights"
        loads.clear()
        assert torch.equal(model(**batch).last_hidden_state, reference)
    assert loads == [], "a hit must not load offloaded weights"


@pytest.mark.parametrize(
    ("task", "head", "arch", "text"),
    [
        ("feature-extraction", tf.BertModel, "bert", "a shared template with a query"),
        ("text-classification", tf.BertForSequenceClassification, "bert", "a shared template with a query"),
        ("fill-mask", tf.BertForMaskedLM, "bert", "a shared [MASK] with a query"),
        ("text-generation", tf.LlamaForCausalLM, "llama", "a shared template with a query"),
    ],
)
def test_pipeline_round_trip_with_save_pretrained(tmp_path, tokenizer, task, head, arch, text):
    path = saved_model(tmp_path / "model", arch, head, tokenizer, vocab_size=TOKENIZER_VOCAB)
    pipe = tf.pipeline(task, model=str(path), model_kwargs={"layer_cache": LayerCacheConfig()})
    kwargs = {"max_new_tokens": 4, "do_sample": False} if task == "text-generation" else {}
    first = pipe(text, **kwargs)
    second = pipe(text, **kwargs)
    assert pipe.model.layer_cache.stats()["total"]["hits"] > 0
    assert json.dumps(first, default=str) == json.dumps(second, default=str)

    pipe.save_pretrained(tmp_path / "saved")
    tokenizer_config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert "layer_cache" not in tokenizer_config
    assert "layer_cache" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    warm = tf.pipeline(task, model=str(tmp_path / "saved"))
    assert json.dumps(warm(text, **kwargs), default=str) == json.dumps(first, default=str)
    assert warm.model.layer_cache.stats()["total"]["misses"] == 0


def test_uninstall_restores_transformers_and_install_brings_it_back(tmp_path):
    path = saved_model(tmp_path, "bert", tf.BertModel)
    hf_layercache.uninstall()
    try:
        assert not hf_layercache.integration.is_installed()
        with pytest.raises(TypeError):
            tf.AutoModel.from_pretrained(path, layer_cache=LayerCacheConfig())
    finally:
        hf_layercache.install()
    assert hasattr(tf.AutoModel.from_pretrained(path, layer_cache=LayerCacheConfig()), "layer_cache")


def test_a_model_without_known_layers_gets_an_error_naming_it_and_layers():
    class Plain(tf.PreTrainedModel):
        config_class = tf.PreTrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"layers of Plain.*layers='encoder.layer'"):
        hf_layercache.enable(Plain(tf.PreTrainedConfig()))


def test_layers_by_module_path():
    model = tiny_model("bert")
    hf_layercache.enable(model, LayerCacheConfig(layers="encoder.layer"))
    assert len(model.layer_cache.layers) == 3
    hf_layercache.disable(model)
    hf_layercache.enable(model, LayerCacheConfig(layers=["encoder.layer.0", "encoder.layer.1"]))
    batch = tiny_batch("bert")
    with torch.no_grad():
        first, second = model(**batch).last_hidden_state, model(**batch).last_hidden_state
    assert torch.equal(first, second) and model.layer_cache.stats()["total"]["hits"] == 2 * 3
    with pytest.raises(ValueError, match=r"has no module 'encoder\.nope'"):
        hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(layers="encoder.nope"))


def test_stats_report_per_layer_counters_bytes_and_time_saved():
    model = hf_layercache.enable(tiny_model("bert"))
    batch = tiny_batch("bert")
    with torch.no_grad():
        model(**batch)
        model(**batch)
    report = model.layer_cache.stats()
    assert set(report["layers"]) == {"encoder.layer.0", "encoder.layer.1", "encoder.layer.2"}
    for counters in report["layers"].values():
        assert counters["lookups"] == 6 and counters["hits"] == 3 and counters["misses"] == 3
        assert counters["compute_seconds"] > 0 and counters["seconds_saved"] > 0
    assert report["banks"]["encoder.layer"]["entries"] == 3
    assert report["total"]["bytes"] >= 3 * 7 * 32 * 4
    assert "encoder.layer.0" in model.layer_cache.format_stats()
    model.layer_cache.clear()
    assert model.layer_cache.stats()["total"]["entries"] == 0 and model.layer_cache.stats()["total"]["lookups"] == 0


def test_seconds_saved_is_hits_times_measured_seconds_per_row_and_a_warm_cache_keeps_the_measurement(tmp_path):
    model = hf_layercache.enable(tiny_model("bert"))
    batch = tiny_batch("bert")
    with torch.no_grad():
        model(**batch)
        model(**batch)
    layers = model.layer_cache.stats()["layers"]
    for counters in layers.values():
        assert counters["computed"] == 3 and counters["hits"] == 3 and counters["compute_seconds"] > 0
        assert counters["seconds_saved"] == pytest.approx(counters["hits"] * counters["compute_seconds"] / 3)
    model.layer_cache.save(tmp_path)

    warm = hf_layercache.enable(tiny_model("bert"))
    warm.layer_cache.load(tmp_path)
    with torch.no_grad():
        warm(**batch)
    for name, counters in warm.layer_cache.stats()["layers"].items():  # 100% hits, nothing computed here
        assert counters["hits"] == 3 and counters["computed"] == 0
        assert counters["seconds_saved"] == pytest.approx(layers[name]["seconds_saved"])
    warm.layer_cache.clear()  # the entries go, the measurement of the model's speed stays
    with torch.no_grad():
        warm(**batch)
        warm(**batch)
    assert all(c["seconds_saved"] > 0 for c in warm.layer_cache.stats()["layers"].values())

    header_path = tmp_path / "layer_cache_config.json"
    header = json.loads(header_path.read_text())
    header["timing"] = {"encoder.layer.0": {"rows": -1, "seconds": 0.1}}
    header_path.write_text(json.dumps(header))
    with pytest.raises(hf_layercache.LayerCacheFileError, match="'timing' must map layer names"):
        warm.layer_cache.load(tmp_path)
