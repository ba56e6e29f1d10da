"""The attention strategy (AttnCache) on tiny models: eager-exact on identical inputs, masks, mixed batches, GQA,
decode steps, verification, namespaces, warm caches, and what it refuses."""

import contextlib

import pytest
import torch
import transformers as tf
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.strategies.attention.eager import attention_scores, attention_with_lse, masked_scores, repeat_kv
from hf_layercache.strategies.attention.function import ATTN_IMPLEMENTATION, boolean_mask
from hf_layercache.strategies.attention.masks import all_true, any_along, any_true
from hf_layercache.strategies.attention.rows import position_norms

ARCHITECTURES = ["bert", "distilbert", "gpt2", "llama", "qwen2", "gemma3"]  # llama, qwen2, gemma3: GQA (4 / 2 heads)
ATOL = 1e-5


@contextlib.contextmanager
def eager(model):
    """The model with transformers' own eager attention (tiny models share their config object, so put it back)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def run(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs)


def reference(arch, batch, **kwargs):
    with eager(tiny_model(arch)) as model:
        return run(model, batch, output_attentions=True, **kwargs)


def totals(model):
    return model.layer_cache.stats()["total"]


@pytest.fixture
def enable():
    """Builds tiny models with the attention strategy and disables them afterwards: tiny models of one architecture
    share their config object, so the selected attention implementation must never outlive a test."""
    models = []

    def make(arch, head=None, **config):
        config.setdefault("attention_gate_interval", 0)  # the mechanism itself; the gate has its own tests
        model = hf_layercache.enable(tiny_model(arch, head=head), LayerCacheConfig(strategy="attention", **config))
        models.append(model)
        return model

    yield make
    for model in reversed(models):  # newest first: each restores the implementation the one before it selected
        hf_layercache.disable(model)


def assert_maps_close(maps, expected):
    assert len(maps) == len(expected)
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_identical_input_hits_and_equals_eager(arch, enable):
    batch = tiny_batch(arch, batch=3)
    expected = reference(arch, batch)
    model = enable(arch)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    first = run(model, batch, output_attentions=True)
    after_first = totals(model)
    second = run(model, batch, output_attentions=True)
    after_second = totals(model)
    rows_times_layers = 3 * len(model.layer_cache.layers)
    assert after_first["misses"] == rows_times_layers and after_first["hits"] == 0
    assert after_second["hits"] - after_first["hits"] == rows_times_layers
    assert after_second["misses"] == after_first["misses"]
    for out in (first, second):
        torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=ATOL)
        assert_maps_close(out.attentions, expected.attentions)  # output_attentions: the maps actually used


def test_disable_restores_the_model_exactly():
    model = tiny_model("llama")
    batch = tiny_batch("llama")
    before_out = run(model, batch).last_hidden_state
    implementation = model.config._attn_implementation
    dicts = {name: dict(m.__dict__) for name, m in model.named_modules()}
    hf_layercache.enable(model, LayerCacheConfig(strategy="attention"))
    run(model, batch)
    hf_layercache.disable(model)
    assert model.config._attn_implementation == implementation == "sdpa"
    assert all(m.__dict__.keys() == dicts[name].keys() for name, m in model.named_modules())
    assert torch.equal(run(model, batch).last_hidden_state, before_out)


def test_mixed_batch_serves_hit_rows_and_computes_only_missed_rows(enable):
    batch = tiny_batch("bert", batch=4)
    expected = reference("bert", batch)
    model = enable("bert")
    run(model, {k: v[1:3] for k, v in batch.items()})  # rows 1 and 2 are cached
    before = totals(model)
    out = run(model, batch, output_attentions=True)
    after = totals(model)
    layers = len(model.layer_cache.layers)
    assert after["hits"] - before["hits"] == 2 * layers
    assert after["misses"] - before["misses"] == 2 * layers
    assert len(model.layer_cache.banks["encoder.layer.0"]) == 4  # the two missed rows were stored
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=ATOL)
    assert_maps_close(out.attentions, expected.attentions)


def changed_last_token(batch):
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, -1] = 3 if int(batch["input_ids"][0, -1]) != 3 else 4
    return changed


def test_a_changed_token_recomputes_only_its_row_and_column(enable):
    batch = tiny_batch("bert", batch=1, length=12)
    model = enable("bert", attention_position_tolerance=0.0, layers=[0])
    run(model, batch)
    run(model, changed_last_token(batch))
    assert totals(model)["hits"] == 1
    reuse = model.layer_cache.strategy.reuse
    assert (reuse["hits"], reuse["recomputed"], reuse["length"]) == (1, 2, 12)  # one row, one column
    assert reuse["corrected"] == 11  # bidirectional: every other row attends the changed column


def test_a_causal_hit_corrects_only_the_rows_after_a_changed_token(enable):
    batch = tiny_batch("llama", batch=1, length=12)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, 6] = 3 if int(batch["input_ids"][0, 6]) != 3 else 4
    expected = reference("llama", changed)
    model = enable("llama", attention_position_tolerance=0.0, layers=[0])
    run(model, batch)
    out = run(model, changed, output_attentions=True)
    reuse = model.layer_cache.strategy.reuse
    # the changed position's row is computed and its column rescored; of the other rows only 7 to 11 attend that
    # column, so only they are corrected: the six before it are served as stored, and exact
    assert (reuse["hits"], reuse["recomputed"], reuse["corrected"]) == (1, 2, 5)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=ATOL)
    assert_maps_close(out.attentions, expected.attentions)


def test_mask_reductions_through_bytes_equal_torchs():
    generator = torch.Generator().manual_seed(0)
    masks = [
        torch.rand(2, 1, 12, 12, generator=generator) > 0.5,
        torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(3, 1, 12, 12),  # expanded: stride 0
        (torch.rand(12, 16, generator=generator) > 0.9).T,  # not contiguous
        torch.zeros(4, 0, dtype=torch.bool),
        torch.ones(5, 5, dtype=torch.bool),
    ]
    for mask in masks:
        for dim in range(-mask.dim(), mask.dim()):
            assert torch.equal(any_along(mask, dim), mask.any(dim))
        assert torch.equal(any_along(mask, -1, keepdim=True), mask.any(-1, keepdim=True))
        assert any_true(mask) == bool(mask.any()) and all_true(mask) == bool(mask.all())


def test_position_norms_are_the_same_in_either_memory_layout():
    states = torch.randn(12, 4, 8)  # (L, heads, d), as a projection leaves them
    for view in (states.transpose(0, 1), states.transpose(0, 1).contiguous()):
        expected = torch.linalg.vector_norm(view, dim=(0, 2))
        torch.testing.assert_close(position_norms(view), expected)


def test_a_causal_hit_with_a_changed_suffix_is_exact(enable):
    batch = tiny_batch("llama", batch=1, length=12)
    changed = changed_last_token(batch)
    expected = reference("llama", changed)
    model = enable("llama", attention_position_tolerance=0.0)
    run(model, batch)
    out = run(model, changed, output_attentions=True)
    # causal: the positions before the change keep their states in every layer, so every layer hits and is exact
    assert totals(model)["hits"] == len(model.layer_cache.layers)
    assert 0 < model.layer_cache.strategy.recomputed_fraction < 0.5
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=ATOL)
    assert_maps_close(out.attentions, expected.attentions)
    model.layer_cache.clear()  # counters go with the entries
    assert model.layer_cache.strategy.recomputed_fraction == 0 and totals(model)["hits"] == 0


def layer_hits(model, name):
    return model.layer_cache.stats()["layers"][name]["hits"]


@pytest.mark.parametrize(("arch", "first"), [("bert", "encoder.layer.0"), ("llama", "layers.0")])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_the_new_requests_mask_is_applied_to_a_stored_map(arch, first, padding, enable):
    ids = tiny_batch(arch, batch=1, length=10)["input_ids"]
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[0, -3:] = 0
    else:
        mask[0, :3] = 0
    padded = {"input_ids": ids, "attention_mask": mask}
    expected = reference(arch, padded)
    model = enable(arch, attention_position_tolerance=0.0)
    run(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})  # stored: the same tokens, no padding
    out = run(model, padded, output_attentions=True)
    # the first layer sees the same states at every position, so it reuses the stored map under the new mask (later
    # layers may recompute more: without the padded tokens, the other positions' states differ)
    assert layer_hits(model, first) == 1
    real = mask[0].bool()
    torch.testing.assert_close(out.last_hidden_state[0, real], expected.last_hidden_state[0, real], rtol=0, atol=ATOL)
    for maps in out.attentions:
        assert torch.all(maps[0][:, real][..., ~real] == 0)  # no weight on masked positions
    assert_maps_close([m[0][:, real] for m in out.attentions], [m[0][:, real] for m in expected.attentions])


def test_rows_stored_as_left_padding_are_computed_when_they_become_real(enable):
    ids = tiny_batch("llama", batch=1, length=16)["input_ids"]
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = reference("llama", full)
    model = enable("llama", attention_position_tolerance=0.0)
    run(model, {"input_ids": ids, "attention_mask": padded})  # stored: three queries with nothing to attend to
    out = run(model, full, output_attentions=True)
    # the first layer sees the same states at every position and reuses the entry; the rows that attended nothing
    # when stored have no normaliser, so they are computed
    assert layer_hits(model, "layers.0") == 1
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=ATOL)
    assert_maps_close(out.attentions, expected.attentions)


def test_a_longer_request_than_the_stored_one_is_exact(enable):
    ids = tiny_batch("bert", batch=1, length=10)["input_ids"]
    short = torch.ones_like(ids)
    short[0, -4:] = 0
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = reference("bert", full)
    model = enable("bert", attention_position_tolerance=0.0)
    run(model, {"input_ids": ids, "attention_mask": short})  # the stored map never attended the last four positions
    out = run(model, full, output_attentions=True)
    assert layer_hits(model, "encoder.layer.0") == 1  # their columns are rescored, not left at zero
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=ATOL)
    assert_maps_close(out.attentions, expected.attentions)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_miss_computes_output_and_normaliser_as_eager_attention_does(kv_heads):
    """What a miss stores: through sdpa's fused CPU kernel where it applies, else eager math; either way the output,
    the log-normaliser and (asked for) the map of eager attention, GQA and padding included."""
    query, key, value = torch.randn(2, 4, 9, 8), torch.randn(2, kv_heads, 9, 8), torch.randn(2, kv_heads, 9, 8)
    keep = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    keep[1, ..., 6:] = False  # right padding
    scores = masked_scores(query, key, keep, 0.3)
    left = keep.clone()
    left[1, ..., :2] = False  # left padding: the first two queries of row 1 have nothing to attend to
    for rows in (keep, left):
        output, lse, maps = attention_with_lse(query, key, value, rows, 0.3)
        expected = attention_scores(query, key, rows, 0.3)  # eager: a uniform row where nothing is attended
        assert maps is None
        torch.testing.assert_close(output, torch.matmul(expected, repeat_kv(value, 4 // kv_heads)), atol=ATOL, rtol=0)
        live = rows.any(-1).expand_as(lse)  # an empty row's normaliser is never used
        want = masked_scores(query, key, rows, 0.3).logsumexp(-1)
        torch.testing.assert_close(lse[live], want[live], atol=ATOL, rtol=1e-6)
    _, lse, maps = attention_with_lse(query, key, value, keep, 0.3, weights=True)
    torch.testing.assert_close(maps, attention_scores(query, key, keep, 0.3), atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=ATOL, rtol=1e-6)


def test_registered_mask_function_always_gives_a_boolean_mask():
    mask = boolean_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    assert mask.dtype == torch.bool and tuple(mask.shape) == (2, 1, 4, 4)  # sdpa would return None here
    assert torch.equal(mask[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())


def sharpen(model, factor=50.0):
    """Scale a tiny BERT's query and key weights: random initialisation gives almost uniform attention, for which
    any stored map is nearly right; trained models attend sharply."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                param.mul_(factor)
    return model


def test_verification_refuses_a_wrong_map_that_the_key_checks_let_through(enable):
    first, second = tiny_batch("bert", batch=1, seed=1), tiny_batch("bert", batch=1, seed=2)
    with eager(sharpen(tiny_model("bert"))) as plain:
        expected = run(plain, second).last_hidden_state
    # every position counts as unchanged, so only verification stands between the stored map and a wrong answer
    loose = dict(threshold=-1.0, attention_position_tolerance=1e6)
    guarded = sharpen(enable("bert", **loose))
    run(guarded, first)
    out = run(guarded, second).last_hidden_state
    stats = guarded.layer_cache.stats()["total"]
    assert stats["hits"] == 0 and stats["verified"] == len(guarded.layer_cache.layers)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    unguarded = sharpen(enable("bert", attention_verify_rows=0, **loose))
    run(unguarded, first)
    served = run(unguarded, second).last_hidden_state
    assert totals(unguarded)["hits"] == len(unguarded.layer_cache.layers)
    assert (served - expected).abs().max() > 1e-2  # what the guard prevented: 1000 times the tolerance


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_prefill_hits_decode_steps_compute_and_tokens_match_eager(arch, enable):
    batch = tiny_batch(arch, batch=1)
    with eager(tiny_model(arch, head=tf.AutoModelForCausalLM)) as plain:
        expected = plain.generate(**batch, max_new_tokens=5, do_sample=False)
    model = enable(arch, head=tf.AutoModelForCausalLM)
    for _ in range(2):
        assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False), expected)
    stats = totals(model)
    layers = len(model.layer_cache.layers)
    assert stats["hits"] == layers and stats["misses"] == layers  # prefills only: the second one hit
    assert stats["bypassed"] == 2 * 4 * layers  # four decode steps per generate, computed normally


def test_a_namespace_is_served_every_layer_again_after_another_one_ran(enable):
    """Namespace isolation itself is in the conformance suite (tests/test_strategy_conformance.py); here: b's traffic
    displaces none of a's entries, so a's repeat hits in every layer."""
    batch = tiny_batch("bert", batch=1)
    model = enable("bert")
    with model.layer_cache.namespace("tenant-a"):
        run(model, batch)
    with model.layer_cache.namespace("tenant-b"):
        run(model, batch)
    with model.layer_cache.namespace("tenant-a"):
        run(model, batch)
    assert totals(model)["hits"] == len(model.layer_cache.layers)


def test_bypass_and_training_compute_eagerly(enable):
    batch = tiny_batch("llama")
    expected = reference("llama", batch).last_hidden_state
    model = enable("llama")
    with model.layer_cache.bypass():
        out = run(model, batch).last_hidden_state
    assert totals(model)["lookups"] == 0 and len(model.layer_cache.banks["layers.0"]) == 0
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


def test_storage_dtype_float16_is_close(enable):
    batch = tiny_batch("llama")
    expected = reference("llama", batch).last_hidden_state
    model = enable("llama", storage_dtype="float16")
    run(model, batch)
    served = run(model, batch).last_hidden_state
    assert totals(model)["hits"] > 0
    assert model.layer_cache.banks["layers.0"].get(0).query.dtype == torch.float16
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-3)


def test_warm_cache_round_trip_and_damaged_entries_are_refused(tmp_path, enable):
    batch = tiny_batch("llama", batch=2)
    model = enable("llama")
    run(model, batch)
    model.layer_cache.save(tmp_path)
    warm = enable("llama")
    warm.layer_cache.load(tmp_path)
    run(warm, batch)
    assert totals(warm)["hits"] == 2 * len(warm.layer_cache.layers) and totals(warm)["misses"] == 0

    state = model.layer_cache.banks["layers.0"].state_dict()
    state["entry.0.lse"] = state["entry.0.lse"].float()  # a normaliser rounded by a foreign writer
    with pytest.raises(ValueError, match="'lse'"):
        warm.layer_cache.banks["layers.0"].check_state(state)
    state = model.layer_cache.banks["layers.0"].state_dict()
    state["entry.0.lse"] = state["entry.0.lse"][:2]
    with pytest.raises(ValueError, match="heads"):
        warm.layer_cache.banks["layers.0"].check_state(state)


def test_models_whose_attention_cannot_be_replaced_are_refused(enable):
    with pytest.raises(ValueError, match="AttentionInterface"):
        enable("mpnet")  # its attention does not dispatch through transformers' AttentionInterface
    model = enable("t5")  # dispatches, but adds a relative position bias the maps cannot carry
    with pytest.raises(ValueError, match="position_bias"):
        run(model, tiny_batch("t5"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attention_key_dim", 0),
        ("attention_key_dim", 129),
        ("attention_key_segments", 0),
        ("attention_position_tolerance", -0.1),
        ("attention_position_tolerance", float("inf")),
        ("attention_verify_rows", -1),
        ("attention_max_error", 2.0),
        ("attention_max_error", True),
    ],
)
def test_config_validates_attention_fields(field, value):
    with pytest.raises(ValueError, match=field):
        LayerCacheConfig(strategy="attention", **{field: value})


@pytest.mark.slow
def test_minilm_templated_requests_reuse_maps_faithfully(minilm_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path)
    template = "Please route this support ticket to the right team. Our policy: answer within two days. Ticket: {}"
    texts = [template.format(t) for t in ("my parcel never arrived", "I was charged twice", "the screen stays black")]
    batches = [tokenizer(t, padding="max_length", max_length=48, return_tensors="pt") for t in texts]
    with eager(tf.AutoModel.from_pretrained(minilm_path).eval()) as plain:
        expected = [run(plain, b).last_hidden_state for b in batches]
    model = hf_layercache.enable(
        tf.AutoModel.from_pretrained(minilm_path).eval(),
        LayerCacheConfig(strategy="attention", attention_gate_interval=0),  # 48 tokens: the gate would not cache
    )
    try:
        torch.testing.assert_close(run(model, batches[0]).last_hidden_state, expected[0], rtol=0, atol=ATOL)
        torch.testing.assert_close(run(model, batches[0]).last_hidden_state, expected[0], rtol=0, atol=ATOL)
        assert totals(model)["hits"] == 6  # the identical request hit in every layer, within 1e-5 of eager
        for batch, want in zip(batches[1:], expected[1:], strict=True):
            got = run(model, batch).last_hidden_state
            real = batch["attention_mask"][0].bool()
            cosine = torch.nn.functional.cosine_similarity(got[0, real], want[0, real], dim=-1)
            assert cosine.min() > 0.999
        assert totals(model)["hits"] > 6  # the other tickets reused the template's maps
        assert model.layer_cache.strategy.recomputed_fraction < 0.5
    finally:
        hf_layercache.disable(model)


def test_disable_undoes_every_attachment_including_the_global_registration():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model = tiny_model("llama")
    implementation = model.config._attn_implementation
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    hf_layercache.enable(model, LayerCacheConfig(strategy="attention"))
    controller = model.layer_cache
    kinds = {line.split(":")[0] for line in controller.hooks.inventory()}
    assert kinds == {"call", "attribute", "forward"}
    assert "hf_layercache" in AttentionInterface._global_mapping
    hf_layercache.disable(model)
    assert len(controller.hooks) == 0
    assert "hf_layercache" not in AttentionInterface._global_mapping
    assert "hf_layercache" not in AttentionMaskInterface._global_mapping
    assert model.config._attn_implementation == implementation
    assert {name: dict(m.__dict__).keys() for name, m in model.named_modules()} == {
        name: d.keys() for name, d in before.items()
    }


def test_a_head_whose_map_moved_is_computed_exactly_and_the_others_reused(enable):
    first, second = tiny_batch("bert", batch=1, seed=1), tiny_batch("bert", batch=1, seed=2)

    def sharpen_head_0(model):  # head 0 attends sharply (input-specific); the others stay near uniform
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("query.weight", "key.weight")):
                    param[:8].mul_(50.0)
        return model

    with eager(sharpen_head_0(tiny_model("bert"))) as plain:
        expected = run(plain, second, output_attentions=True).attentions[0][0]
    model = sharpen_head_0(enable("bert", threshold=-1.0, attention_position_tolerance=1e6))
    run(model, first)
    served = run(model, second, output_attentions=True).attentions[0][0]
    layers = len(model.layer_cache.layers)
    reuse = model.layer_cache.strategy.reuse
    assert totals(model)["hits"] == layers  # served, not refused: three of four heads were close enough
    assert 1 <= reuse["heads_recomputed"] <= layers and reuse["heads"] == 4 * layers
    torch.testing.assert_close(served[0], expected[0], rtol=0, atol=ATOL)  # head 0: exact
    assert (served[1:] - expected[1:]).abs().max() > 1e-4  # the others: the stored maps, under the max error
