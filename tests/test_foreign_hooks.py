"""Other code's forward hooks on a cached model: steering vectors, activation patching, probes.

A served layer (or a served whole-model output) skips the hooks of the modules it stands for, so while a hook the
cache does not know is on the model, requests compute; remove it and they hit again. Real torch hooks on tiny
random models, every strategy.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as tf
from tiny import tiny_model
from torch.nn.utils import prune

import hf_layercache
from hf_layercache import LayerCacheConfig

STRATEGIES = ["exact", "prefix", "semantic"]
TOLERANCE = 1e-4
PROMPT = {"input_ids": torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(3))}


def cached_llama(strategy: str) -> tf.PreTrainedModel:
    model = tiny_model("llama", tf.AutoModelForCausalLM, seed=0)
    return hf_layercache.enable(model, LayerCacheConfig(strategy=strategy))


def run(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(**PROMPT).logits


def uncached(model) -> torch.Tensor:
    with model.layer_cache.bypass():
        return run(model)


def hits(model) -> int:
    return model.layer_cache.stats()["total"]["hits"]


def warm(model) -> torch.Tensor:
    """Run the prompt until it hits, and return the plain output."""
    truth = uncached(model)
    run(model)
    before = hits(model)
    assert (run(model) - truth).abs().max() <= TOLERANCE
    assert hits(model) > before
    return truth


def steer(vector: torch.Tensor):
    def hook(module, args, output):
        return (output[0] + vector, *output[1:]) if isinstance(output, tuple) else output + vector

    return hook


def double_input(module, args, kwargs):
    if args:
        return (args[0] * 2, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 2}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["forward hook", "forward pre-hook"])
def test_a_hook_that_changes_a_layer_is_computed_and_its_removal_serves_again(strategy, kind):
    model = cached_llama(strategy)
    plain = warm(model)
    layer = model.model.layers[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "forward hook":
            handle = layer.register_forward_hook(steer(torch.randn(model.config.hidden_size)))
        else:
            handle = layer.register_forward_pre_hook(double_input, with_kwargs=True)
        hooked = uncached(model)
        assert (hooked - plain).abs().max() > 1e-3, "the hook does change the output"
        before = hits(model)
        for _ in range(2):
            assert (run(model) - hooked).abs().max() <= TOLERANCE, "served the unhooked model's entries"
        assert hits(model) == before
    assert sum(f"{kind} on model.layers.1" in str(w.message) for w in caught) == 1, "one warning names the hook"
    handle.remove()
    before = hits(model)
    assert (run(model) - plain).abs().max() <= TOLERANCE
    assert hits(model) > before, "the entries made before the hook serve again"


def test_the_attention_strategy_keeps_serving_a_steered_model():
    """It runs every module (maps are reused inside the attention function on the inputs the hooks left), so a
    hook needs no bypass, and the steered model is served its own outputs."""
    model = cached_llama("attention")
    plain = run(model)
    handle = model.model.layers[1].register_forward_hook(steer(torch.randn(model.config.hidden_size)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steered = uncached(model)
        assert (steered - plain).abs().max() > 1e-3
        for _ in range(2):  # no warning: nothing is bypassed for the hook
            assert (run(model) - steered).abs().max() <= TOLERANCE
    handle.remove()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_hook_that_records_a_sub_module_sees_every_request(strategy):
    """A probe on a module inside a layer: a served layer would skip it, so it would record nothing."""
    model = cached_llama(strategy)
    warm(model)
    recorded = []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: recorded.append(out.clone()))
    with pytest.warns(UserWarning, match="layers.0.mlp"):
        run(model)
    run(model)
    handle.remove()
    assert len(recorded) == 2
    assert (recorded[0] - recorded[1]).abs().max() == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_global_module_hook_is_computed(strategy):
    model = cached_llama(strategy)
    plain = warm(model)
    vector = torch.randn(model.config.hidden_size)

    def steer_layers(module, args, output):
        return steer(vector)(module, args, output) if isinstance(module, type(model.model.layers[0])) else None

    handle = torch.nn.modules.module.register_module_forward_hook(steer_layers)
    try:
        with pytest.warns(UserWarning, match="global forward hook"):
            hooked = run(model)
        assert (hooked - plain).abs().max() > 1e-3
        assert (hooked - uncached(model)).abs().max() <= TOLERANCE
    finally:
        handle.remove()
    before = hits(model)
    assert (run(model) - plain).abs().max() <= TOLERANCE
    assert hits(model) > before


@pytest.mark.parametrize("strategy", ["exact", "prefix"])
def test_a_hook_on_the_root_runs_around_the_cache_which_keeps_serving(strategy):
    """The root's hooks see the arguments before the cache and its output after: both paths pass through them."""
    model = cached_llama(strategy)
    plain = warm(model)
    handle = model.register_forward_hook(lambda m, a, out: out.__class__(logits=out.logits * 2))
    before = hits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing computes uncached
        assert (run(model) - 2 * plain).abs().max() <= 2 * TOLERANCE
    assert hits(model) > before
    handle.remove()


def test_transformers_own_hooks_leave_the_cache_serving():
    """transformers installs recording hooks on the layers at the first call asking for hidden states or attention
    maps and keeps them, and ``enable_input_require_grads`` (PEFT calls it) hooks the embeddings: value-neutral, they
    must not turn the cache off."""
    model = cached_llama("exact")
    plain = warm(model)
    model.enable_input_require_grads()
    with torch.inference_mode():
        model(**PROMPT, output_hidden_states=True)
    assert any(layer._forward_hooks for layer in model.model.layers), "transformers installed its hooks"
    assert model.model.embed_tokens._forward_hooks
    before = hits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (run(model) - plain).abs().max() <= TOLERANCE
    assert hits(model) > before


def test_a_module_put_in_with_a_hook_on_it_is_seen():
    """No hook is registered after the check that found the model clean: the module arrives with its hook."""
    model = cached_llama("exact")
    mlp = copy.deepcopy(model.model.layers[0].mlp)
    mlp.register_forward_hook(lambda m, a, out: out + 1.0)
    warm(model)
    model.model.layers[0].mlp = mlp
    with pytest.warns(UserWarning, match="layers.0.mlp"):
        assert (run(model) - uncached(model)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_hook_marked_value_neutral_leaves_the_cache_serving(strategy):
    """A call counter on a layer, marked: no warning, and the cache keeps hitting."""
    model = cached_llama(strategy)
    plain = warm(model)
    calls = []
    handle = model.model.layers[1].register_forward_hook(
        hf_layercache.value_neutral_hook(lambda module, args, output: calls.append(1))
    )
    before = hits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (run(model) - plain).abs().max() <= TOLERANCE
    assert hits(model) > before
    handle.remove()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torch_pruning_keeps_the_cache_serving_the_pruned_model(strategy):
    """``torch.nn.utils.prune`` computes the weight in a pre-hook from ``weight_orig`` and ``weight_mask``, which the
    watch follows: the pruned model is served its own outputs, and a later write to the mask is seen."""
    model = cached_llama(strategy)
    warm(model)
    linear = model.model.layers[0].mlp.up_proj
    prune.l1_unstructured(linear, "weight", amount=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned = warm(model)  # hits, and what it serves is the pruned model's output
        with torch.no_grad():
            linear.weight_mask[:, : linear.in_features // 2] = 0
        masked = uncached(model)
        assert (masked - pruned).abs().max() > 1e-4, "the mask write does change the output"
        assert (run(model) - masked).abs().max() <= TOLERANCE


def test_a_hook_that_cannot_be_marked_is_refused_with_the_way_out():
    with pytest.raises(TypeError, match="wrap it in a function"):
        hf_layercache.value_neutral_hook(print)
