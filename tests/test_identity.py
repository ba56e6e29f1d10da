"""An entry serves only the computation that made it: adapters, weights by any route, configs, storage dtypes (#28).

Every test changes the model's function by a route users take, then checks the next request against the same model
run uncached. PEFT and transformers' adapter API are the real libraries, on tiny random models.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings

import pytest
import torch
import transformers as tf
from tiny import CONFIGS, tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig, LayerCacheMismatchError
from hf_layercache.persistence import LayerCacheIntegrityError

peft = pytest.importorskip("peft", reason="the [dev] extra installs peft")

STRATEGIES = ["exact", "prefix", "semantic", "attention"]
TOLERANCE = 1e-4
PROMPT = {"input_ids": torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(3))}


def lora(**kwargs) -> peft.LoraConfig:
    return peft.LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **kwargs})


def causal(strategy: str = "exact", seed: int = 0, **config) -> tf.PreTrainedModel:
    model = tiny_model("llama", tf.AutoModelForCausalLM, seed=seed)
    return hf_layercache.enable(model, LayerCacheConfig(strategy=strategy, **config))


def run(model, batch=PROMPT) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**batch)
    return out.logits if "logits" in out else out.last_hidden_state


def uncached(cache_owner, model, batch=PROMPT) -> torch.Tensor:
    with cache_owner.layer_cache.bypass():
        return run(model, batch)


def served_right(cache_owner, model, batch=PROMPT) -> float:
    """Run twice (the second may hit) and return the largest difference from the uncached output."""
    run(model, batch)
    return (run(model, batch) - uncached(cache_owner, model, batch)).abs().max().item()


def hits(model) -> int:
    return model.layer_cache.stats()["total"]["hits"]


def two_adapters(strategy: str):
    base = causal(strategy)
    model = peft.get_peft_model(base, lora(), adapter_name="tone")
    model.add_adapter("mood", lora())
    return base, model.eval()


# --- PEFT adapters ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_switching_adapters_serves_each_its_own_outputs_and_comes_back_warm(strategy):
    base, model = two_adapters(strategy)
    outputs = {}
    for name in ("tone", "mood"):
        model.set_adapter(name)
        assert served_right(base, model) <= TOLERANCE
        outputs[name] = run(model)
    assert (outputs["tone"] - outputs["mood"]).abs().max() > 0.01  # the adapters do compute different functions
    model.set_adapter("tone")
    before = hits(base)
    assert (run(model) - outputs["tone"]).abs().max() <= TOLERANCE
    if strategy in ("exact", "prefix", "semantic"):
        assert hits(base) > before, "a -> b -> a reuses a's entries"


@pytest.mark.parametrize("strategy", ["exact", "prefix"])
def test_the_cache_enabled_after_the_adapters_sees_them_too(strategy):
    model = peft.get_peft_model(tiny_model("llama", tf.AutoModelForCausalLM), lora(), adapter_name="tone")
    model.add_adapter("mood", lora())
    inner = hf_layercache.enable(model.base_model.model, LayerCacheConfig(strategy=strategy))
    model.eval()
    for name in ("tone", "mood", "tone"):
        model.set_adapter(name)
        assert served_right(inner, model) <= TOLERANCE


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_disable_adapter_serves_the_base_model(strategy):
    base, model = two_adapters(strategy)
    assert served_right(base, model) <= TOLERANCE
    with model.disable_adapter():
        assert served_right(base, model) <= TOLERANCE
        without = run(model)
    assert (without - run(model)).abs().max() > 0.01


@pytest.mark.parametrize("route", ["merge_adapter", "unmerge_adapter", "merge_and_unload", "scale"])
def test_merging_and_scaling_never_serve_stale(route):
    base, model = two_adapters("exact")
    assert served_right(base, model) <= TOLERANCE
    if route == "merge_and_unload":
        model = model.merge_and_unload()
    else:
        model.merge_adapter()
        if route == "unmerge_adapter":
            assert served_right(base, model) <= TOLERANCE
            model.unmerge_adapter()
        elif route == "scale":
            model.unmerge_adapter()
            run(model)
            for module in model.modules():
                if hasattr(module, "set_scale"):
                    module.set_scale("tone", 3.0)
    assert served_right(base, model) <= TOLERANCE


def test_adapter_weights_loaded_later_are_seen():
    base, model = two_adapters("exact")
    assert served_right(base, model) <= TOLERANCE
    other = peft.get_peft_model(tiny_model("llama", tf.AutoModelForCausalLM), lora(), adapter_name="tone")
    peft.set_peft_model_state_dict(
        model, peft.get_peft_model_state_dict(other, adapter_name="tone"), adapter_name="tone"
    )
    assert served_right(base, model) <= TOLERANCE


def test_adding_and_deleting_adapters_keeps_the_others_entries():
    base, model = two_adapters("exact")
    model.set_adapter("tone")
    expected = run(model)
    model.add_adapter("new", lora())
    model.delete_adapter("mood")
    before = hits(base)
    assert torch.equal(run(model), expected) and hits(base) > before  # a's entries survived
    model.set_adapter("new")
    assert served_right(base, model) <= TOLERANCE


def test_a_mixed_adapter_batch_runs_uncached():
    base, model = two_adapters("exact")
    model.set_adapter("tone")
    run(model)
    names = ["tone", "mood"]
    with torch.inference_mode():
        mixed = model(**PROMPT, adapter_names=names).logits
        with base.layer_cache.bypass():
            reference = model(**PROMPT, adapter_names=names).logits
    assert (mixed - reference).abs().max() <= TOLERANCE


def test_prefix_blocks_are_shared_only_across_adapters_that_leave_the_stacks_alone():
    base = causal("prefix", block_size=4)
    head_only = dict(target_modules=["lm_head"])
    model = peft.get_peft_model(base, lora(**head_only), adapter_name="tone").eval()
    model.add_adapter("mood", lora(**head_only))
    model.add_adapter("new", lora())
    model.eval()  # add_adapter leaves the new layers in training mode, which runs uncached
    for name in ("tone", "mood"):
        model.set_adapter(name)
        before = hits(base)
        assert served_right(base, model) <= TOLERANCE
    assert hits(base) > before, "b reuses a's blocks: neither touches the decoder layers"
    model.set_adapter("new")
    run(model)
    first = base.layer_cache.stats()["total"]
    assert first["misses"] > 0
    assert served_right(base, model) <= TOLERANCE


# --- transformers' own adapter API ------------------------------------------------------------------------------------
@pytest.mark.skipif(
    tuple(int(part) for part in peft.__version__.split(".")[:2]) < (0, 22),
    reason="transformers 5's adapter API needs PEFT >= 0.22 (it raises otherwise)",
)
def test_transformers_adapter_api_switches_disables_and_loads(tmp_path):
    donor = peft.get_peft_model(tiny_model("llama", tf.AutoModelForCausalLM, seed=7), lora(), adapter_name="saved")
    donor.save_pretrained(tmp_path / "adapter")
    model = causal("exact")
    model.add_adapter(lora(), adapter_name="tone")
    model.add_adapter(lora(), adapter_name="mood")
    model.eval()  # add_adapter leaves the new layers in training mode, which runs uncached
    for name in ("tone", "mood"):
        model.set_adapter(name)
        assert served_right(model, model) <= TOLERANCE
    model.disable_adapters()
    assert served_right(model, model) <= TOLERANCE
    model.enable_adapters()
    model.load_adapter(str(tmp_path / "adapter" / "saved"), adapter_name="loaded")
    model.set_adapter("loaded")
    assert served_right(model, model) <= TOLERANCE


# --- modules in training mode ----------------------------------------------------------------------------------------
def _sampling(strategy: str) -> tuple[tf.PreTrainedModel, dict[str, torch.Tensor]]:
    """A model in eval mode whose dropout is switched on alone (Monte Carlo dropout): BERT's dropout modules, or a
    Llama's attention dropout (no module of its own: the attention reads ``self.training``)."""
    kind = "llama" if strategy == "prefix" else "bert"
    fields = {"attention_gate_interval": 0} if strategy == "attention" else {}
    model = hf_layercache.enable(tiny_model(kind), LayerCacheConfig(strategy=strategy, **fields))
    batch = tiny_batch(kind)
    run(model, batch)  # entries computed in eval mode
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
            module.train()
        elif hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
            module.train()
    return model, batch


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_module_in_training_mode_computes_what_the_model_samples(strategy):
    """Each call computes what the model uncached computes from the same seed (a new sample per call), with a
    warning naming the module; nothing is served or stored. model.eval() serves the eval-mode entries again."""
    model, batch = _sampling(strategy)
    entries = sum(len(bank) for bank in model.layer_cache.banks.values())
    before = hits(model)
    with pytest.warns(UserWarning, match=r"its module '[\w.]+' \(\w+\) is in training mode"):
        torch.manual_seed(0)
        first = run(model, batch)
    torch.manual_seed(0)
    assert torch.equal(first, uncached(model, model, batch))
    torch.manual_seed(1)
    second = run(model, batch)
    assert not torch.equal(first, second)  # dropout at 0.5 samples anew
    assert hits(model) == before and sum(len(bank) for bank in model.layer_cache.banks.values()) == entries
    model.eval()
    run(model, batch)
    real = batch["attention_mask"].bool()  # semantic leaves pad positions as they come
    assert (run(model, batch) - uncached(model, model, batch))[real].abs().max() <= TOLERANCE and hits(model) > before


def test_adapters_added_in_training_mode_compute_until_eval():
    """PEFT's get_peft_model leaves its new layers in training mode (LoRA dropout random): requests compute as the
    model samples them until model.eval()."""
    base = causal("exact")
    model = peft.get_peft_model(base, lora(lora_dropout=0.5), adapter_name="tone")
    with pytest.warns(UserWarning, match=r"'model\.layers\.0\.self_attn\.q_proj' \(Linear\) is in training mode"):
        torch.manual_seed(0)
        sampled = run(model)
    torch.manual_seed(0)
    assert torch.equal(sampled, uncached(base, model)) and hits(base) == 0
    model.eval()
    assert served_right(base, model) <= TOLERANCE and hits(base) > 0


# --- weights changed by any route -------------------------------------------------------------------------------------
@contextlib.contextmanager
def swapping_tensors():
    """torch's conversions and ``load_state_dict`` swap each parameter's tensor in (``torch.utils.swap_tensors``)
    instead of assigning ``.data``: the same Python object, another tensor behind it."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def _swap_in_new_values(weight: torch.nn.Parameter) -> None:
    new = torch.nn.Parameter(torch.randn_like(weight))
    with torch.no_grad():
        while new._version < weight._version:
            new.mul_(1.0)
    assert new._version == weight._version  # the version alone cannot tell the swap
    torch.utils.swap_tensors(weight, new)


def _write(model, route: str) -> None:
    weight = model.model.layers[0].mlp.up_proj.weight
    if route == ".data.copy_":
        weight.data.copy_(torch.randn_like(weight))
    elif route == ".data +=":
        weight.data += 0.5
    elif route == "held .data":
        model._held.mul_(2.0)
    elif route == ".data =":
        weight.data = torch.randn_like(weight)
    elif route == "load_state_dict(assign=True)":
        other = tiny_model("llama", tf.AutoModelForCausalLM, seed=9).state_dict()
        model.load_state_dict(other, assign=True)
    elif route == "to(float64)":
        model.to(torch.float64)
    elif route == "replaced submodule":
        model.model.layers[1].mlp.act_fn = torch.nn.ReLU()
    elif route == "buffer .data":
        rotary = model.model.rotary_emb
        rotary.inv_freq.data.mul_(2.0)
    elif route == "swap_tensors":
        _swap_in_new_values(weight)
    elif route == "load_state_dict (swapping)":
        with swapping_tensors():
            model.load_state_dict(tiny_model("llama", tf.AutoModelForCausalLM, seed=9).state_dict())
    elif route == "to(float64) (swapping)":
        with swapping_tensors():
            model.to(torch.float64)
    else:
        raise AssertionError(route)


ROUTES = [
    ".data.copy_",
    ".data +=",
    "held .data",
    ".data =",
    "load_state_dict(assign=True)",
    "to(float64)",
    "replaced submodule",
    "buffer .data",
    "swap_tensors",
    "load_state_dict (swapping)",
    "to(float64) (swapping)",
]


@pytest.mark.parametrize("strategy", ["exact", "prefix"])
@pytest.mark.parametrize("route", ROUTES)
def test_no_route_of_changing_the_weights_serves_stale(route, strategy):
    model = causal(strategy)
    model._held = model.model.layers[0].mlp.up_proj.weight.data  # taken before, written after (EMA loops do)
    stale = run(model)
    assert (run(model) - stale).abs().max() <= TOLERANCE and hits(model) > 0
    _write(model, route)
    fresh = run(model)
    if route.startswith("to(float64)"):
        assert fresh.dtype == torch.float64  # the same function to 1e-7, in another dtype
    else:
        assert (fresh - stale).abs().max() > 1e-3, "the route does change the function"
    assert (fresh - uncached(model, model)).abs().max() <= TOLERANCE
    assert model.layer_cache.stats()["total"]["invalidations"] >= 1


def test_disable_restores_the_tensor_classes_and_data():
    model = tiny_model("llama", tf.AutoModelForCausalLM)
    classes = {name: type(t) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    hf_layercache.enable(model, LayerCacheConfig(strategy="exact"))
    assert type(model.lm_head.weight) is not torch.nn.Parameter  # watched: .data shares the version counter
    assert isinstance(model.lm_head.weight, torch.nn.Parameter)
    hf_layercache.disable(model)
    assert {name: type(t) for name, t in [*model.named_parameters(), *model.named_buffers()]} == classes
    version = model.lm_head.weight._version
    model.lm_head.weight.data.add_(1.0)
    assert model.lm_head.weight._version == version  # torch's own .data again


def test_a_tensor_swapped_in_is_watched_and_given_back_like_the_others():
    model = causal("exact")
    weight = model.model.layers[0].mlp.up_proj.weight
    stale = run(model)
    _swap_in_new_values(weight)
    swapped = run(model)
    assert (swapped - stale).abs().max() > 1e-3
    assert type(weight) is not torch.nn.Parameter and isinstance(weight, torch.nn.Parameter)  # watched again
    assert served_right(model, model) <= TOLERANCE and hits(model) > 0
    weight.data.add_(0.5)  # through .data: seen only on a watched tensor
    assert (run(model) - uncached(model, model)).abs().max() <= TOLERANCE
    assert (run(model) - swapped).abs().max() > 1e-3
    hf_layercache.disable(model)
    assert type(weight) is torch.nn.Parameter


@pytest.mark.parametrize("route", ["slot write", "to(float64) (overwriting)"])
def test_a_tensor_put_in_without_registration_is_watched_too(route):
    """accelerate writes ``module._parameters[name]`` directly, and torch's conversions do so under
    ``set_overwrite_module_params_on_conversion(True)``: no registration hook fires, and the new tensor's ``.data``
    writes must still be seen."""
    model = causal("exact")
    run(model)
    module = model.model.layers[0].mlp.up_proj
    if route == "slot write":
        module._parameters["weight"] = torch.nn.Parameter(torch.randn_like(module.weight))
    else:
        before = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            model.to(torch.float64)
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(before)
    replaced = run(model)
    assert served_right(model, model) <= TOLERANCE and hits(model) > 0
    module.weight.data.mul_(2.0)
    assert (run(model) - replaced).abs().max() > 1e-3
    assert (run(model) - uncached(model, model)).abs().max() <= TOLERANCE


def test_a_tensor_that_left_the_model_gets_its_own_class_back():
    model = causal("exact")
    old = model.model.layers[0].mlp.up_proj.weight
    run(model)
    assert type(old) is not torch.nn.Parameter
    model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.randn_like(old))
    run(model)
    assert type(old) is torch.nn.Parameter
    assert type(model.model.layers[0].mlp.up_proj.weight) is not torch.nn.Parameter


@pytest.mark.parametrize("leaves", ["disable", "replaced"])
def test_a_tensor_two_cached_models_share_stays_watched_while_one_still_holds_it(leaves):
    """One embedding table in two models: when the first lets go of it (disabled, or its slot given another
    tensor), a ``.data`` write must still reach the second's watch."""
    first, second = causal("exact", seed=0), causal("exact", seed=1)
    table = first.model.embed_tokens.weight
    second.model.embed_tokens.weight = table
    run(second)
    run(second)
    if leaves == "disable":
        hf_layercache.disable(first)
    else:
        first.model.embed_tokens.weight = torch.nn.Parameter(table.detach().clone())
        run(first)  # the first's watch notices the change and gives back what it no longer holds
    table.data.mul_(0.5)
    assert served_right(second, second) <= TOLERANCE
    hf_layercache.disable(second)
    assert type(table) is torch.nn.Parameter


def test_requests_never_rescan_the_model():
    model = causal("exact")  # Llama's forward slices its layer list: a new ModuleList every call, of no model
    run(model)
    scans = model.layer_cache.watch.scans
    for _ in range(3):
        run(model, tiny_batch("llama"))
    assert model.layer_cache.watch.scans == scans
    model.model.layers[0].mlp.act_fn = torch.nn.ReLU()
    run(model)
    assert model.layer_cache.watch.scans == scans + 1


@pytest.mark.parametrize("strategy", ["exact", "prefix"])
def test_memory_written_without_torch_is_caught_by_verification_and_dropped_by_weights_changed(strategy):
    model = causal(strategy, verify_fraction=1.0)
    stale = run(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the positive control: verified entries of unchanged weights agree
        run(model)
    total = model.layer_cache.stats()["total"]
    assert total["audited"] > 0 and total["audited_unacceptable"] == 0
    weight = model.model.layers[0].mlp.up_proj.weight
    weight.detach().numpy()[:] += 0.5  # no torch op: no version counter moves
    assert model.layer_cache.stats()["total"]["invalidations"] == 0
    with pytest.warns(UserWarning, match="disagrees"):
        checked = run(model)
    assert (checked - uncached(model, model)).abs().max() <= TOLERANCE
    assert (checked - stale).abs().max() > 1e-3
    model.layer_cache.weights_changed()
    assert model.layer_cache.stats()["total"]["invalidations"] == 1
    assert model.layer_cache.stats()["total"]["entries"] == 0


# --- the precision a call computes in ---------------------------------------------------------------------------------
def autocast_run(model, autocast: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return run(model).float()


@pytest.mark.parametrize("strategy", ["exact", "prefix", "semantic"])
@pytest.mark.parametrize("first", ["autocast", "full precision"])
def test_autocast_and_full_precision_never_serve_each_other(strategy, first):
    """``torch.autocast`` computes the same weights in bfloat16: each precision is served its own entries."""
    model = causal(strategy)
    with model.layer_cache.bypass():
        truth = {autocast: autocast_run(model, autocast) for autocast in (True, False)}
    assert (truth[True] - truth[False]).abs().max() > 1e-3, "autocast does change the values"
    for autocast in [True, False] if first == "autocast" else [False, True]:
        computed = autocast_run(model, autocast)
        assert (computed - truth[autocast]).abs().max() <= TOLERANCE, "served the other precision's entries"
        before = hits(model)
        assert (autocast_run(model, autocast) - truth[autocast]).abs().max() <= TOLERANCE
        assert hits(model) > before  # and each precision does hit its own


def _set_legacy_medium() -> None:
    torch.set_float32_matmul_precision("medium")


def _set_legacy_cudnn_ieee() -> None:
    torch.backends.cudnn.allow_tf32 = False


def _set_per_backend_bf16() -> None:
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"


@pytest.fixture
def restore_float32_precision():
    """Precision settings are process-wide: put torch's defaults back (the per-backend settings the legacy calls
    leave alone first, then the legacy calls, which leave both kinds consistent)."""
    yield
    if hasattr(torch.backends.mkldnn, "matmul"):  # torch >= 2.9
        for setting in (torch.backends, torch.backends.mkldnn, torch.backends.mkldnn.conv, torch.backends.cudnn):
            setting.fp32_precision = "none"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True
    assert hf_layercache.identity.float32_precision_state() == ""


@pytest.mark.usefixtures("restore_float32_precision")
@pytest.mark.parametrize("strategy", ["exact", "prefix", "semantic"])
@pytest.mark.parametrize("switch", [_set_legacy_medium, _set_legacy_cudnn_ieee, _set_per_backend_bf16])
def test_a_float32_precision_switch_selects_its_own_entries(strategy, switch):
    """``torch.set_float32_matmul_precision`` and its per-backend successors let matmuls compute with TF32 or
    bfloat16 inner products: entries computed before the switch are never served after it, nor the reverse."""
    if switch is _set_per_backend_bf16 and not hasattr(torch.backends.mkldnn.matmul, "fp32_precision"):
        pytest.skip("the per-backend precision API needs torch >= 2.9")
    model = causal(strategy)
    run(model)
    run(model)
    assert hits(model) > 0, "the default precision hits its own entries"
    switch()
    assert hf_layercache.identity.float32_precision_state() != ""
    before = hits(model)
    switched = run(model)
    assert hits(model) == before, "served entries computed under the default precision"
    assert (switched - uncached(model, model)).abs().max() <= TOLERANCE
    assert (run(model) - switched).abs().max() <= TOLERANCE
    assert hits(model) > before, "the switched precision hits its own entries"


@pytest.mark.usefixtures("restore_float32_precision")
@pytest.mark.skipif(not hasattr(torch.backends.mkldnn, "matmul"), reason="per-backend settings: torch >= 2.9")
def test_the_public_precision_properties_read_what_torch_c_getter_reads(monkeypatch):
    """The per-backend settings are read through the function under torch's properties where it exists; the
    properties themselves (the fallback) must tell every switch apart the same way."""
    identity = hf_layercache.identity
    states = []
    for switch in (lambda: None, _set_legacy_medium, _set_legacy_cudnn_ieee, _set_per_backend_bf16):
        switch()
        states.append(identity.float32_precision_state())
        with monkeypatch.context() as patch:
            patch.setattr(identity, "_FP32_PRECISION_GETTER", None)
            identity._precision_reader.cache_clear()
            assert identity.float32_precision_state() == states[-1]
        identity._precision_reader.cache_clear()
    assert states[0] == "" and "" not in states[1:]  # the switches accumulate: each state departs from the defaults


@pytest.mark.usefixtures("restore_float32_precision")
def test_the_legacy_precision_reads_of_older_torch_see_each_legacy_switch(monkeypatch):
    """Before torch 2.9 only the legacy settings exist: read them, not the per-backend ones, as older torch must."""
    monkeypatch.setattr(hf_layercache.identity, "_precision_reader", lambda: None)
    assert hf_layercache.identity.float32_precision_state() == ""
    torch.set_float32_matmul_precision("high")
    assert hf_layercache.identity.float32_precision_state() == "matmul:high"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    assert hf_layercache.identity.float32_precision_state() == "matmul:highest,cudnn-conv:ieee"


# --- the identity: every byte, the config, the storage dtype ----------------------------------------------------------
def _fine_tuned_rows(model, rows=5) -> None:
    with torch.no_grad():
        model.get_input_embeddings().weight[-rows:] += 0.01


def test_five_retrained_embedding_rows_change_the_identity(tmp_path):
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="exact"))
    before = model.layer_cache.identity
    run(model, tiny_batch("bert"))
    model.save_pretrained(tmp_path)
    tuned = tiny_model("bert")
    _fine_tuned_rows(tuned)
    hf_layercache.enable(tuned, LayerCacheConfig(strategy="exact"))
    assert tuned.layer_cache.identity.weights_hash != before.weights_hash
    with pytest.raises(LayerCacheMismatchError, match="weights_hash"):
        tuned.layer_cache.load(tmp_path)


@pytest.mark.parametrize(("field", "value"), [("layer_norm_eps", 1e-3), ("hidden_act", "relu")])
def test_a_config_that_computes_otherwise_refuses_the_cache_naming_the_field(tmp_path, field, value):
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="exact"))
    run(model, tiny_batch("bert"))
    model.save_pretrained(tmp_path)
    other_config = tf.BertConfig(**{**CONFIGS["bert"].to_dict(), field: value})
    other = tf.BertModel(other_config).eval()
    other.load_state_dict(tiny_model("bert").state_dict())
    hf_layercache.enable(other, LayerCacheConfig(strategy="exact"))
    assert other.layer_cache.identity.weights_hash == model.layer_cache.identity.weights_hash
    with pytest.raises(LayerCacheMismatchError, match=f"config.{field}"):
        other.layer_cache.load(tmp_path)


def test_bookkeeping_fields_and_the_attention_kernel_are_not_the_identity():
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="exact"))
    identity = model.layer_cache.identity
    model.config.architectures = ["SomethingElse"]
    model.config.id2label = {0: "x", 1: "y"}
    model.set_attn_implementation("sdpa")
    run(model, tiny_batch("bert"))
    assert model.layer_cache.stats()["total"]["invalidations"] == 0
    assert model.layer_cache.identity.key() == identity.key()


def test_a_rounded_cache_never_loads_into_a_lossless_config(tmp_path):
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="exact", storage_dtype="float16"))
    run(model, tiny_batch("bert"))
    model.save_pretrained(tmp_path)
    with pytest.raises(LayerCacheMismatchError, match="storage_dtype"):
        tf.AutoModel.from_pretrained(tmp_path, layer_cache=LayerCacheConfig(strategy="exact"))
    restored = tf.AutoModel.from_pretrained(tmp_path)  # its own saved config: float16 by choice
    assert restored.layer_cache.config.storage_dtype == "float16"
    assert restored.layer_cache.stats()["total"]["entries"] > 0


def test_a_signed_cache_loaded_without_a_key_says_it_was_not_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_LAYERCACHE_INTEGRITY_KEY", raising=False)
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="exact", integrity_key="secret"))
    run(model, tiny_batch("bert"))
    model.save_pretrained(tmp_path)
    saved = (tmp_path / "layer_cache_config.json").read_text()
    assert "secret" not in saved and json.loads(saved)["signature"]
    with pytest.warns(UserWarning, match="NOT checked"):
        tf.AutoModel.from_pretrained(tmp_path)
    header = json.loads(saved)
    header["banks"]["encoder.layer"]["entries"] += 1  # tampered
    (tmp_path / "layer_cache_config.json").write_text(json.dumps(header))
    monkeypatch.setenv("HF_LAYERCACHE_INTEGRITY_KEY", "secret")  # the key found in the environment is used
    with pytest.raises(LayerCacheIntegrityError, match="does not match"):
        tf.AutoModel.from_pretrained(tmp_path)


# --- copies -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_deepcopy_of_a_used_model_gives_an_independent_cache(strategy, arch):
    if strategy == "prefix" and arch == "bert":
        pytest.skip("prefix reuse is for causal decoders")
    head = tf.AutoModelForCausalLM if arch == "llama" else None
    gate = {"attention_gate_interval": 0} if strategy == "attention" else {}  # store from the first call on
    model = hf_layercache.enable(tiny_model(arch, head), LayerCacheConfig(strategy=strategy, **gate))
    batch = tiny_batch(arch)
    run(model, batch)
    twin = copy.deepcopy(model)
    assert twin.layer_cache is not model.layer_cache
    assert twin.layer_cache.stats()["total"]["entries"] == model.layer_cache.stats()["total"]["entries"]
    expected = run(model, batch)  # what the original serves from its entries
    assert (run(twin, batch) - expected).abs().max() <= TOLERANCE
    twin.layer_cache.clear()
    assert model.layer_cache.stats()["total"]["entries"] > 0
    with torch.no_grad():
        twin.get_input_embeddings().weight.mul_(2.0)
    assert (run(model, batch) - expected).abs().max() <= TOLERANCE  # the original's weights and cache are its own
