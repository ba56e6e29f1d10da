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


def real_rows(out: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [out[r, mask[r].bool()] for r in range(out.shape[0])]


def repadded(batch: dict, extra: int, side: str) -> dict:
    """The same rows padded with ``extra`` more columns on ``side``."""
    pad = torch.zeros_like(batch["input_ids"][:, :extra])
    join = (lambda a, b: torch.cat([b, a], 1)) if side == "left" else (lambda a, b: torch.cat([a, b], 1))
    return {"input_ids": join(batch["input_ids"], pad), "attention_mask": join(batch["attention_mask"], pad)}


def alone(batch: dict, row: int) -> dict:
    """One row on its own, without its pads."""
    real = batch["attention_mask"][row].bool()
    return {
        "input_ids": batch["input_ids"][row, real][None],
        "attention_mask": batch["attention_mask"][row, real][None],
    }


def served_like_uncached(model, layouts: list[dict]) -> None:
    """Each layout hits on every row in every cached layer, and its real positions equal uncached within 1e-5."""
    layers = len(model.layer_cache.layers)
    for inputs in layouts:
        with model.layer_cache.bypass():
            expected = run(model, inputs).last_hidden_state
        hits = totals(model)["hits"]
        served = run(model, inputs).last_hidden_state
        assert totals(model)["hits"] - hits == inputs["input_ids"].shape[0] * layers
        mask = inputs["attention_mask"]
        for got, want in zip(real_rows(served, mask), real_rows(expected, mask), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


ENCODERS_AND_DECODERS = ["bert", "roberta", "distilbert", "mpnet", "llama", "gpt2", "qwen2", "gemma3"]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_text_twice_in_one_cold_batch_is_computed_once(arch):
    """#31: a 200-text job with 14 in-batch duplicates computed them twice; the twin is now copied."""
    model = hf_layercache.enable(tiny_model(arch), LayerCacheConfig(strategy="exact"))
    batch = tiny_batch(arch, batch=3)
    twice = {name: torch.cat([t, t[:1]]) for name, t in batch.items()}  # row 3 repeats row 0
    options = {"use_cache": False} if arch == "llama" else {}  # with a KV cache a batch is computed whole
    with model.layer_cache.bypass():
        expected = run(model, twice, **options).last_hidden_state
    served = run(model, twice, **options).last_hidden_state
    layers = len(model.layer_cache.layers)
    assert totals(model)["misses"] == 3 * layers and totals(model)["hits"] == layers
    stack = next(bank for name, bank in model.layer_cache.banks.items() if name != "request")
    assert len(stack) == 3
    assert torch.equal(served[3], served[0])
    mask = twice["attention_mask"]
    for got, want in zip(real_rows(served, mask), real_rows(expected, mask), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_what_a_hit_gives_at_pad_positions_is_what_the_docs_say():
    """The README's claim (#31): in the layout it was computed in, a hit is bit-identical, pads included; in another
    layout, the real tokens equal uncached and the pads are zeros, so pooling must use the mask."""
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="exact"))
    batch = tiny_batch("bert")  # row 1 has two pads on the right
    first = run(model, batch).last_hidden_state
    assert torch.equal(run(model, batch).last_hidden_state, first)
    wider = repadded(batch, 3, "right")
    with model.layer_cache.bypass():
        uncached = run(model, wider).last_hidden_state
    served = run(model, wider).last_hidden_state
    pads = wider["attention_mask"] == 0
    assert served[pads].abs().max() == 0 and uncached[pads].abs().max() > 0.1
    torch.testing.assert_close(served[~pads], uncached[~pads], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ENCODERS_AND_DECODERS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_a_text_hits_whatever_batch_and_padding_it_arrives_in(arch, padding):
    """Keys cover a row's real tokens: re-padded to another length, or alone, a text hits; its real positions equal
    the uncached output of that layout within 1e-5 (uncached itself moves ~1e-7 between batch shapes), and the
    same layout is served bit for bit."""
    model = tiny_model(arch)
    batch = tiny_batch(arch, padding=padding)
    reference = run(model, batch).last_hidden_state
    hf_layercache.enable(model)
    run(model, batch)
    assert torch.equal(run(model, batch).last_hidden_state, reference)
    unmoved = [r for r in range(3) if padding == "right" or batch["attention_mask"][r, 0]]  # left pads move tokens
    served_like_uncached(model, [repadded(batch, 3, "right"), *(alone(batch, r) for r in unmoved)])


@pytest.mark.parametrize("arch", ENCODERS_AND_DECODERS)
def test_with_position_ids_any_left_padding_hits(arch):
    """Explicit positions (as generate passes them) say where the tokens are: more or fewer pads in front hit."""
    model = tiny_model(arch)

    def positioned(inputs: dict) -> dict:
        return {**inputs, "position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)}

    batch = positioned(tiny_batch(arch, padding="left"))
    hf_layercache.enable(model)
    run(model, batch)
    served_like_uncached(model, [positioned(repadded(batch, 2, "left")), positioned(alone(batch, 1))])


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_left_pads_that_move_absolute_positions_are_another_request(arch):
    """Without position_ids, more pads in front move an absolute-position model's tokens: a miss, never a wrong hit."""
    model = tiny_model(arch)
    batch = tiny_batch(arch, padding="left")
    hf_layercache.enable(model)
    run(model, batch)
    hits = totals(model)["hits"]
    run(model, repadded(batch, 1, "left"))
    assert totals(model)["hits"] == hits


def test_an_encoder_decoder_keys_the_layout_too():
    model = tiny_model("t5")
    batch = tiny_batch("t5")
    hf_layercache.enable(model)
    run(model, batch)
    hits = totals(model)["hits"]
    run(model, {**repadded(batch, 1, "right"), "decoder_input_ids": batch["decoder_input_ids"]})
    assert totals(model)["hits"] == hits  # another layout: computed (two stacks, two masks)
    run(model, batch)
    assert totals(model)["hits"] > hits


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_hits_a_text_stored_in_another_batch(arch):
    """A prompt prefilled in a left-padded batch is served when it comes back alone (generate passes the
    positions), and generation continues with the uncached tokens."""
    model = tiny_model(arch, tf.AutoModelForCausalLM)
    batch = tiny_batch(arch, padding="left")
    single = alone(batch, 1)
    reference = model.generate(**single, max_new_tokens=5, do_sample=False)
    hf_layercache.enable(model)
    model.generate(**batch, max_new_tokens=5, do_sample=False)
    hits = totals(model)["hits"]
    assert torch.equal(model.generate(**single, max_new_tokens=5, do_sample=False), reference)
    assert totals(model)["hits"] - hits == len(model.layer_cache.layers)


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


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
def test_a_flag_passed_as_none_with_the_config_asking_runs_uncached(flag):
    """transformers versions differ on whether ``None`` reads the config: the cache takes either as asking, and
    returns what uncached transformers returns."""
    model = tiny_model("bert", tf.BertModel)
    model.set_attn_implementation("eager")
    batch = tiny_batch("bert")
    setattr(model.config, flag, True)
    reference = run(model, batch, **{flag: None})
    hf_layercache.enable(model)
    run(model, batch, **{flag: False})
    out = run(model, batch, **{flag: None})
    field = "attentions" if flag == "output_attentions" else "hidden_states"
    assert (getattr(out, field) is None) == (getattr(reference, field) is None)
    assert all(map(torch.equal, getattr(out, field) or (), getattr(reference, field) or ()))
    assert totals(model)["bypassed"] > 0


def test_the_key_memo_answers_as_keying_afresh_and_stays_bounded():
    from hf_layercache.strategies.exact.digests import RowKeyMemo, row_keys

    memo = RowKeyMemo(layout_free=True, size=3)
    batches = [tiny_batch("bert", seed=seed, padding=padding) for seed in (1, 2) for padding in ("right", "left")]
    for _ in range(2):  # the second round is answered from the memo (two of four still in it)
        for batch in batches:
            for namespace in ("default", "tenant-b"):
                assert memo.row_keys(batch, namespace) == row_keys(batch, namespace, layout_free=True)
    assert len(memo._keys) == 3
    one = tiny_batch("bert", seed=3)
    other = {**one, "input_ids": one["input_ids"].clone()}
    other["input_ids"][0, 1] += 1  # one token of one row: that row's key changes, the others' do not
    first, second = memo.row_keys(one, "default"), memo.row_keys(other, "default")
    assert first[0].digest != second[0].digest and [k.digest for k in first[1:]] == [k.digest for k in second[1:]]
    ids = one["input_ids"]
    reshaped = {**one, "input_ids": ids.reshape(ids.shape[1], ids.shape[0]).contiguous().reshape(ids.shape)}
    assert memo.row_keys(reshaped, "default") == row_keys(reshaped, "default", layout_free=True)


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

    def stack_bytes(m):
        return m.layer_cache.stats()["banks"]["encoder.layer"]["bytes"]

    assert stack_bytes(full) - stack_bytes(model) == 3 * 7 * 32 * 2  # the stored states take half the bytes


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


# --- the whole-request fast path ------------------------------------------------------------------------------------
class Calls:
    """Counts the calls of a module (the embeddings: a call that runs the model body at all calls them)."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(hf_layercache.value_neutral_hook(self._count))

    def _count(self, *_):
        self.n += 1


@pytest.mark.parametrize("head", [tf.AutoModel, tf.AutoModelForSequenceClassification, tf.AutoModelForMaskedLM])
def test_a_repeated_request_is_answered_without_running_the_model(head):
    """The first repeat already skips the model (the first computation kept the whole output)."""
    model = tiny_model("bert", head)
    batch = tiny_batch("bert")
    reference = run(model, batch)
    hf_layercache.enable(model)
    embeddings = Calls(model.get_input_embeddings())
    run(model, batch)
    assert embeddings.n == 1
    served = run(model, batch)
    assert embeddings.n == 1  # nothing ran
    assert type(served) is type(reference) and served.keys() == reference.keys()
    assert all(torch.equal(served[k], reference[k]) for k in reference)
    assert totals(model)["hits"] == 3 * len(model.layer_cache.layers)
    shuffled = {k: v[[2, 0, 1]] for k, v in batch.items()}  # the same rows in another order: still nothing runs
    out = run(model, shuffled)
    assert embeddings.n == 1 and all(torch.equal(out[k], reference[k][[2, 0, 1]]) for k in reference)


def test_a_row_computed_beside_repeated_ones_is_served_whole_when_it_repeats():
    """Every computed row keeps its whole output, in a batch of its own or beside rows the stack served: a batch
    mixing a repeated row and a new one runs the body, and the new row alone, sent again, does not."""
    model = hf_layercache.enable(tiny_model("bert"))
    batch = tiny_batch("bert")
    request_bank = model.layer_cache.banks["request"]
    run(model, batch)
    assert len(request_bank) == 3 and len(model.layer_cache.banks["encoder.layer"]) == 3
    mixed = {k: torch.cat([v[:1], v[1:2].flip(-1)]) for k, v in batch.items()}  # row 0 repeats, row 1 is new
    with model.layer_cache.bypass():
        reference = run(model, mixed).last_hidden_state
    embeddings = Calls(model.get_input_embeddings())
    out = run(model, mixed).last_hidden_state  # row 1 computes alone: within the tolerance of the batch's rounding
    assert torch.allclose(out, reference, atol=1e-5) and embeddings.n == 1
    new_row = {k: v[1:] for k, v in mixed.items()}
    assert torch.equal(run(model, new_row).last_hidden_state, out[1:]) and embeddings.n == 1


def test_the_fast_path_needs_the_same_layout_arguments_weights_and_tenant():
    model = tiny_model("bert", tf.AutoModelForSequenceClassification)
    batch = tiny_batch("bert")
    hf_layercache.enable(model)
    embeddings = Calls(model.get_input_embeddings())
    run(model, batch)
    run(model, repadded(batch, 2, "right"))  # another layout: the body runs (its stack hits)
    run(model, batch, return_dict=False)  # other plain arguments: a tuple is not rebuilt from the entries
    with model.layer_cache.namespace("tenant-b"):
        run(model, batch)
    assert embeddings.n == 4
    with torch.no_grad():
        model.classifier.weight.mul_(2)  # a head computes after the cached stack: its weights are watched too
    with model.layer_cache.bypass():
        expected = run(model, batch).logits
    assert torch.equal(run(model, batch).logits, expected) and embeddings.n == 6


def test_request_entries_are_not_saved_and_refill_from_a_warm_stack(tmp_path):
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    hf_layercache.enable(model)
    reference = run(model, batch).last_hidden_state
    model.layer_cache.save(tmp_path)
    warm = hf_layercache.enable(tiny_model("bert"))
    warm.layer_cache.load(tmp_path)
    assert (
        "request" not in warm.layer_cache.stats()["banks"]
        or warm.layer_cache.stats()["banks"]["request"]["entries"] == 0
    )
    embeddings = Calls(warm.get_input_embeddings())
    assert torch.equal(run(warm, batch).last_hidden_state, reference) and embeddings.n == 1  # the stack served it
    assert torch.equal(run(warm, batch).last_hidden_state, reference) and embeddings.n == 1  # then the request bank


@pytest.mark.parametrize("head", [tf.AutoModel, tf.AutoModelForSequenceClassification])
def test_a_served_output_is_a_new_object_made_as_the_models_own(head):
    """The request path assembles outputs without their constructor: the same class, keys in the same order, the same
    attributes (``None`` fields included), tensors of its own that a caller may write without touching the cache."""
    model = tiny_model("bert", head)
    batch = tiny_batch("bert")
    reference = run(model, batch)
    hf_layercache.enable(model)
    embeddings = Calls(model.get_input_embeddings())
    run(model, batch)
    first, second = run(model, batch), run(model, batch)
    assert embeddings.n == 1  # both served from the request bank
    assert model.layer_cache.strategy.request_path._outputs and all(
        shape.direct for shape in model.layer_cache.strategy.request_path._outputs.values()
    )
    for served in (first, second):
        assert type(served) is type(reference) and list(served.keys()) == list(reference.keys())
        assert vars(served).keys() == vars(reference).keys()
        assert all((vars(served)[k] is None) == (vars(reference)[k] is None) for k in vars(reference))
        assert all(torch.equal(served[k], reference[k]) and getattr(served, k) is served[k] for k in reference)
        assert len(served.to_tuple()) == len(reference.to_tuple())
    assert first is not second and all(first[k].data_ptr() != second[k].data_ptr() for k in reference)
    name = next(iter(reference.keys()))
    first[name].add_(1.0)  # the caller's tensor: the next hit is unchanged
    assert torch.equal(run(model, batch)[name], reference[name]) and embeddings.n == 1


def test_an_output_class_with_a_constructor_of_its_own_is_built_by_it():
    from dataclasses import dataclass

    from transformers.utils import ModelOutput

    from hf_layercache.strategies.exact.outputs import _OutputShape

    @dataclass
    class Counted(ModelOutput):
        states: torch.Tensor | None = None
        extra: torch.Tensor | None = None

        def __post_init__(self):
            super().__post_init__()
            self.built = getattr(self, "built", 0) + 1  # state the direct assembly would not make

    states = torch.randn(2, 3)
    shape = _OutputShape(Counted(states=states))
    assert not shape.direct
    rebuilt = shape.rebuild([{"states": states[0]}, {"states": states[1]}])
    assert type(rebuilt) is Counted and rebuilt.built == 1 and torch.equal(rebuilt.states, states)
    assert rebuilt.states.data_ptr() != states.data_ptr() and list(rebuilt.keys()) == ["states"]


def test_the_signature_memo_tells_plain_values_of_other_types_apart():
    model = hf_layercache.enable(tiny_model("bert"))
    path = model.layer_cache.strategy.request_path
    ids = torch.ones(1, 3, dtype=torch.long)
    signatures = {path.signature({"input_ids": ids, "flag": value}, "") for value in (True, 1, 1.0, "1", None)}
    assert len(signatures) == 5
    call = {"input_ids": ids, "flag": True}
    assert path.signature(call, "") == path.signature({"flag": True, "input_ids": ids}, "")  # any argument order
    assert path.signature(call, "lora") != path.signature(call, "")  # the heads' adapters
    assert path.signature({"input_ids": ids, "past_key_values": ids}, "") is None  # a KV cache to fill
    assert path.signature({"input_ids": ids, "fn": print}, "") is None


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
def test_a_config_flag_set_between_hits_is_read_again(flag):
    """The flags a request reads from the config are remembered while the config's attributes stay as they were."""
    model = tiny_model("bert", tf.BertModel)
    model.set_attn_implementation("eager")
    batch = tiny_batch("bert")
    setattr(model.config, flag, True)
    reference = run(model, batch)
    setattr(model.config, flag, False)
    plain = run(model, batch)
    hf_layercache.enable(model)
    run(model, batch)
    run(model, batch)
    bypassed = totals(model)["bypassed"]
    setattr(model.config, flag, True)
    out = run(model, batch)
    field = "attentions" if flag == "output_attentions" else "hidden_states"
    assert getattr(out, field) is not None and totals(model)["bypassed"] > bypassed
    assert all(map(torch.equal, getattr(out, field), getattr(reference, field)))
    setattr(model.config, flag, False)
    again = run(model, batch)
    assert getattr(again, field) is None and torch.equal(again.last_hidden_state, plain.last_hidden_state)
