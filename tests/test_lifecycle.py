"""A cached model through its life: weights that change, autograd, copies, pickling, reloading as something else."""

import copy
import io
import warnings

import pytest
import torch
import transformers as tf
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig, LayerCacheMismatchError


def cached(arch="bert", head=None, **config):
    return hf_layercache.enable(tiny_model(arch, head), LayerCacheConfig(**{"strategy": "exact", **config}))


def infer(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if "logits" in out else out.last_hidden_state


def uncached(model, batch):
    with model.layer_cache.bypass():
        return infer(model, batch)


def hits(model):
    return model.layer_cache.stats()["total"]["hits"]


# --- weights that change --------------------------------------------------------------------------------------------
def test_a_training_step_drops_the_entries_of_the_old_weights():
    model = cached(head=tf.BertForSequenceClassification)
    batch = tiny_batch("bert")
    infer(model, batch), infer(model, batch)
    assert hits(model) > 0
    model.train()
    loss = model(**batch, labels=torch.tensor([0, 1, 0])).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    after_step = infer(model, batch)
    assert torch.equal(after_step, uncached(model, batch))
    assert model.layer_cache.stats()["total"]["invalidations"] == 1


@pytest.mark.parametrize("change", ["load_state_dict", "half", "in_place"])
def test_entries_never_outlive_their_weights(change):
    model = cached("llama", tf.AutoModelForCausalLM)
    batch = tiny_batch("llama")
    stale = infer(model, batch)
    assert torch.equal(infer(model, batch), stale) and hits(model) > 0
    if change == "load_state_dict":
        model.load_state_dict(tiny_model("llama", tf.AutoModelForCausalLM, seed=5).state_dict())
    elif change == "half":
        model.half()
    else:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    fresh = infer(model, batch)
    assert not torch.equal(fresh, stale.to(fresh.dtype))
    assert torch.equal(fresh, uncached(model, batch))
    assert torch.equal(infer(model, batch), fresh)  # and the new weights' entries serve again


def test_a_head_trained_on_a_cached_encoder_keeps_the_encoder_entries():
    """Entries depend on the weights up to the cached states; a head computes after them."""
    model = cached(head=tf.BertForSequenceClassification)
    batch = tiny_batch("bert")
    infer(model, batch)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    before = hits(model)
    assert torch.equal(infer(model, batch), uncached(model, batch))
    assert hits(model) > before
    assert model.layer_cache.stats()["total"]["invalidations"] == 0


# --- autograd ---------------------------------------------------------------------------------------------------------
def test_autograd_requests_compute_with_real_gradients_and_warn_once():
    model = cached()
    reference = tiny_model("bert")
    batch = tiny_batch("bert")
    infer(model, batch)  # the batch is cached
    with pytest.warns(UserWarning, match="autograd on") as record:
        out = model(**batch).last_hidden_state
        out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch)  # once per model
    assert len([w for w in record if "autograd" in str(w.message)]) == 1
    reference(**batch).last_hidden_state.sum().backward()
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected = grads[name].grad
        assert (param.grad is None and expected is None) or torch.equal(param.grad, expected), name
    assert model.layer_cache.stats()["total"]["bypassed"] > 0


def test_frozen_weights_and_autograd_on_still_hit():
    """Nothing would get a gradient, so serving is safe."""
    model = cached()
    model.requires_grad_(False)
    batch = tiny_batch("bert")
    model(**batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch)
    assert hits(model) > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_as_uncached(reentrant):
    batch = tiny_batch("llama")
    labels = batch["input_ids"]
    grads = []
    for enable in (False, True):
        model = tiny_model("llama", tf.AutoModelForCausalLM)
        if enable:
            hf_layercache.enable(model, LayerCacheConfig(strategy="exact"))
            infer(model, batch)
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.25 on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grads[1][name] is not None, name
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


# --- copies and pickling ------------------------------------------------------------------------------------------
def test_deepcopy_is_an_independent_model_with_a_warm_cache_of_its_own():
    model = cached("gpt2", tf.AutoModelForCausalLM)
    batch = tiny_batch("gpt2")
    reference = infer(model, batch)
    twin = copy.deepcopy(model)
    assert twin.layer_cache is not model.layer_cache and twin.layer_cache.model is twin
    assert torch.equal(infer(twin, batch), reference)
    assert hits(twin) > 0  # warm: the copy's first request hits
    with torch.no_grad():
        twin.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    assert not torch.equal(infer(twin, batch), reference)
    assert torch.equal(infer(model, batch), reference)  # the original is untouched
    entries = len(model.layer_cache.banks["transformer.h"])
    twin.layer_cache.clear()
    assert entries == 3 and len(model.layer_cache.banks["transformer.h"]) == entries
    hf_layercache.disable(twin)
    assert "layer_cache" not in twin.__dict__
    assert torch.equal(infer(model, batch), reference)


def test_a_hooked_layer_alone_refuses_to_be_copied_or_pickled():
    model = cached()
    with pytest.raises(TypeError, match="layer cache hook"):
        copy.deepcopy(model.encoder.layer[0])
    with pytest.raises(TypeError, match="layer cache hook"):
        torch.save(model.encoder, io.BytesIO())


def test_torch_save_names_the_cache_and_the_way_out():
    model = cached()
    with pytest.raises(TypeError, match=r"layer cache.*hf_layercache.disable\(model\)"):
        torch.save(model, io.BytesIO())
    hf_layercache.disable(model)
    torch.save(model, io.BytesIO())


# --- reloading as something else ----------------------------------------------------------------------------------
@pytest.fixture
def warm_dir(tmp_path):
    model = cached()
    infer(model, tiny_batch("bert"))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_reloading_with_another_dtype_loads_the_model_and_starts_cold(warm_dir):
    with pytest.warns(UserWarning, match="starting cold"):
        model = tf.AutoModel.from_pretrained(warm_dir, dtype=torch.float16)
    assert model.dtype == torch.float16
    assert model.layer_cache.stats()["total"]["entries"] == 0


def test_reloading_with_another_head_loads_the_model_and_starts_cold(warm_dir):
    with pytest.warns(UserWarning, match="starting cold"):
        model = tf.BertForSequenceClassification.from_pretrained(warm_dir)
    assert model.layer_cache.stats()["total"]["entries"] == 0


def test_asking_for_the_saved_cache_explicitly_keeps_the_error(warm_dir):
    with pytest.raises(LayerCacheMismatchError, match="dtype"):
        tf.AutoModel.from_pretrained(warm_dir, dtype=torch.float16, layer_cache=LayerCacheConfig(strategy="exact"))


def test_output_loading_info_returns_the_pair_with_the_cache_on(warm_dir):
    model, info = tf.AutoModel.from_pretrained(warm_dir, output_loading_info=True)
    assert set(info) >= {"missing_keys", "unexpected_keys"}
    assert model.layer_cache.stats()["total"]["entries"] == 3  # the warm cache's rows
    batch = tiny_batch("bert")
    infer(model, batch)
    assert hits(model) > 0


def test_a_saved_prefix_cache_loaded_into_a_head_it_refuses_loads_the_model_uncached(tmp_path):
    model = hf_layercache.enable(tiny_model("llama", tf.AutoModelForCausalLM), LayerCacheConfig(strategy="prefix"))
    infer(model, tiny_batch("llama"))
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="loads uncached"):
        head = tf.LlamaForSequenceClassification.from_pretrained(tmp_path)
    assert "layer_cache" not in head.__dict__
    with pytest.raises(ValueError, match="strategy='prefix'"):
        tf.LlamaForSequenceClassification.from_pretrained(tmp_path, layer_cache=LayerCacheConfig(strategy="prefix"))
