"""The exact strategy on tiny models of every supported architecture: lossless, row-wise, KV-consistent."""

import pytest
import torch
import transformers as tf
from tiny import ARCHITECTURES, DECODERS, tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig


def run(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs)


def totals(model):
    return model.layer_cache.stats()["total"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_repeated_batch_hits_every_row_and_is_bit_identical(arch):
    model = tiny_model(arch)
    batch = tiny_batch(arch)
    reference = run(model, batch).last_hidden_state
    before = dict(model.__dict__)
    forwards = {name: dict(m.__dict__) for name, m in model.named_modules()}

    hf_layercache.enable(model, LayerCacheConfig(strategy="exact"))
    first = run(model, batch).last_hidden_state
    after_first = totals(model)
    second = run(model, batch).last_hidden_state
    after_second = totals(model)

    layers = len(model.layer_cache.layers)
    rows = batch["input_ids"].shape[0]
    assert after_first["hits"] == 0 and after_first["misses"] == rows * layers
    assert after_second["hits"] - after_first["hits"] == rows * layers
    assert after_second["misses"] == after_first["misses"]
    assert torch.equal(first, reference)
    assert torch.equal(second, reference)

    hf_layercache.disable(model)
    assert model.__dict__.keys() == before.keys()
    assert all(dict(m.__dict__).keys() == forwards[name].keys() for name, m in model.named_modules())
    assert torch.equal(run(model, batch).last_hidden_state, reference)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "mpnet", "t5"])
def test_mixed_batch_computes_only_new_rows_in_order(arch):
    model = tiny_model(arch)
    batch = tiny_batch(arch, batch=4)
    if arch == "t5":
        batch["use_cache"] = False  # with a KV cache the decoder serves batches whole (see the next test)
    reference = run(model, batch).last_hidden_state
    hf_layercache.enable(model)
    run(model, {k: v[1:3] if torch.is_tensor(v) else v for k, v in batch.items()})  # rows 1 and 2 become cached
    before = totals(model)
    out = run(model, batch).last_hidden_state
    after = totals(model)
    n_layers = len(model.layer_cache.layers)
    assert after["hits"] - before["hits"] == 2 * n_layers
    assert after["misses"] - before["misses"] == 2 * n_layers
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_padding_is_exact_and_part_of_the_key(arch, padding):
    model = tiny_model(arch)
    batch = tiny_batch(arch, padding=padding)
    reference = run(model, batch).last_hidden_state
    hf_layercache.enable(model)
    run(model, batch)
    assert torch.equal(run(model, batch).last_hidden_state, reference)
    # the same tokens with one more padding position are another request: a miss, never a wrong hit
    pad = torch.zeros_like(batch["input_ids"][:, :1])
    longer = {
        "input_ids": torch.cat([batch["input_ids"], pad], 1),
        "attention_mask": torch.cat([batch["attention_mask"], pad], 1),
    }
    hits = totals(model)["hits"]
    run(model, longer)
    assert totals(model)["hits"] == hits


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_after_hit_gives_the_uncached_tokens(arch):
    model = tiny_model(arch, tf.AutoModelForCausalLM)
    batch = tiny_batch(arch, padding="left")
    reference = model.generate(**batch, max_new_tokens=6, do_sample=False)
    hf_layercache.enable(model)
    first = model.generate(**batch, max_new_tokens=6, do_sample=False)
    hits = totals(model)["hits"]
    second = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert totals(model)["hits"] > hits  # the prefill was served from the cache
    assert totals(model)["bypassed"] > 0  # decode steps never look up
    assert torch.equal(first, reference)
    assert torch.equal(second, reference)


def test_t5_generate_after_hit_gives_the_uncached_tokens():
    model = tiny_model("t5", tf.AutoModelForSeq2SeqLM)
    batch = tiny_batch("t5")
    batch.pop("decoder_input_ids")
    reference = model.generate(**batch, max_new_tokens=5, do_sample=False)
    hf_layercache.enable(model)
    model.generate(**batch, max_new_tokens=5, do_sample=False)
    hits = totals(model)["hits"]
    assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False), reference)
    assert totals(model)["hits"] > hits


def test_decoder_with_kv_cache_serves_mixed_batches_whole():
    model = tiny_model("llama")
    batch = tiny_batch("llama", batch=4)
    reference = run(model, batch).last_hidden_state
    hf_layercache.enable(model)
    run(model, {k: v[:2] for k, v in batch.items()})
    hits = totals(model)["hits"]
    out = run(model, batch).last_hidden_state
    assert totals(model)["hits"] == hits  # rows 0-1 are cached, but a KV cache needs the whole batch: computed
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    assert torch.equal(run(model, batch).last_hidden_state, out)
    assert totals(model)["hits"] > hits


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
def test_requests_needing_per_layer_outputs_run_uncached(flag):
    model = tiny_model("bert", tf.BertModel)
    model.set_attn_implementation("eager")
    batch = tiny_batch("bert")
    reference = run(model, batch, **{flag: True})
    hf_layercache.enable(model)
    run(model, batch)
    out = run(model, batch, **{flag: True})
    field = "attentions" if flag == "output_attentions" else "hidden_states"
    assert len(getattr(out, field)) == len(getattr(reference, field))
    for got, want in zip(getattr(out, field), getattr(reference, field), strict=True):
        assert torch.equal(got, want)
    assert totals(model)["bypassed"] > 0


def test_training_mode_and_bypass_run_uncached():
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    hf_layercache.enable(model)
    run(model, batch)
    hits = totals(model)["hits"]
    with model.layer_cache.bypass():
        run(model, batch)
    model.train()
    run(model, batch)
    model.eval()
    assert totals(model)["hits"] == hits
    run(model, batch)
    assert totals(model)["hits"] > hits


def test_namespaces_never_share_entries():
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    hf_layercache.enable(model, LayerCacheConfig(namespace="tenant-a"))
    run(model, batch)
    with model.layer_cache.namespace("tenant-b"):
        run(model, batch)
        assert totals(model)["hits"] == 0
        run(model, batch)
        assert totals(model)["hits"] > 0
    assert totals(model)["entries"] == 6


def test_inputs_embeds_and_batch_of_one():
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    reference = run(model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}).last_hidden_state
    hf_layercache.enable(model)
    for _ in range(2):
        out = run(model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}).last_hidden_state
        assert torch.equal(out, reference)
    assert totals(model)["hits"] == len(model.layer_cache.layers)
    changed = run(model, {"inputs_embeds": embeds + 1e-3, "attention_mask": batch["attention_mask"]})
    assert not torch.equal(changed.last_hidden_state, reference)


def test_a_subset_of_layers_is_skipped_exactly():
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    reference = run(model, batch).last_hidden_state
    hf_layercache.enable(model, LayerCacheConfig(layers=[1, 2]))
    assert [layer.name for layer in model.layer_cache.layers] == ["encoder.layer.1", "encoder.layer.2"]
    run(model, batch)
    assert torch.equal(run(model, batch).last_hidden_state, reference)
    assert totals(model)["hits"] == 2 * 3


def test_non_contiguous_layers_are_refused():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="contiguous"):
        hf_layercache.enable(model, LayerCacheConfig(layers=[0, 2]))
    assert "layer_cache" not in model.__dict__


def test_float16_storage_is_close_but_lossy_by_design():
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    reference = run(model, batch).last_hidden_state
    hf_layercache.enable(model, LayerCacheConfig(storage_dtype="float16"))
    run(model, batch)
    out = run(model, batch).last_hidden_state
    assert out.dtype == reference.dtype
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3)
    full = hf_layercache.enable(tiny_model("bert"))
    run(full, batch)
    assert totals(full)["bytes"] - totals(model)["bytes"] == 3 * 7 * 32 * 2  # the stored states take half the bytes


def test_enabling_twice_is_refused_and_disable_is_idempotent():
    model = tiny_model("bert")
    hf_layercache.enable(model)
    with pytest.raises(ValueError, match="already has a layer cache"):
        hf_layercache.enable(model)
    hf_layercache.disable(model)
    hf_layercache.disable(model)
    assert "layer_cache" not in model.__dict__


def test_unusual_inputs_are_exact_or_fail_as_uncached():
    model = tiny_model("bert")
    max_len = model.config.max_position_embeddings
    at_max = tiny_batch("bert", length=max_len)
    over_max = tiny_batch("bert", length=max_len + 1)
    all_padding = tiny_batch("bert")
    all_padding["attention_mask"][0] = 0
    large = tiny_batch("bert", batch=64)
    cases = [at_max, all_padding, large]
    expected = [run(model, b).last_hidden_state for b in cases]
    with pytest.raises(Exception) as uncached_error:
        run(model, over_max)
    hf_layercache.enable(model)
    for batch, reference in zip(cases, expected, strict=True):
        for _ in range(2):
            assert torch.equal(run(model, batch).last_hidden_state, reference)
    with pytest.raises(type(uncached_error.value)):
        run(model, over_max)
    with pytest.raises(type(uncached_error.value)):
        run(model, over_max)


def test_bfloat16_model_is_exact():
    model = tiny_model("llama").to(torch.bfloat16)
    batch = tiny_batch("llama")
    reference = run(model, batch).last_hidden_state
    hf_layercache.enable(model)
    run(model, batch)
    out = run(model, batch).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference)
    assert totals(model)["hits"] == 3 * 3
