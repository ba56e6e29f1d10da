"""The semantic strategy on tiny models (and one real one): what hits, what it serves, and what it must never do."""

import pytest
import torch
import transformers as tf
from tiny import VOCAB, tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig, register_policy
from hf_layercache.fingerprints import MeanEmbedding, MinHash
from hf_layercache.policies.lru import LRUPolicy
from hf_layercache.strategies.semantic.alignment import align_tokens

REUSES = ["residual", "state"]


def run(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs)


def totals(model):
    return model.layer_cache.stats()["total"]


def semantic(**kwargs) -> LayerCacheConfig:
    """Unverified, and ``edits="any"``: these tests exercise serving on one changed token, which the default
    (``"additive"``, tests/test_semantic_edits.py) computes."""
    return LayerCacheConfig(strategy="semantic", **{"verify_fraction": 0.0, "edits": "any", **kwargs})


def one_token_changed(batch: dict) -> dict:
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][:, 2] = (changed["input_ids"][:, 2] + 1) % (VOCAB - 3) + 3
    return changed


def assert_close_on_real_tokens(out, reference, mask, atol=1e-5):
    real = mask.bool()
    torch.testing.assert_close(out[real], reference[real], rtol=0, atol=atol)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "mpnet", "roberta"])
@pytest.mark.parametrize("reuse", REUSES)
def test_identical_input_reproduces_the_uncached_output(arch, reuse):
    model = tiny_model(arch)
    batch = tiny_batch(arch)
    reference = run(model, batch).last_hidden_state
    hf_layercache.enable(model, semantic(reuse=reuse))
    first = run(model, batch).last_hidden_state
    assert totals(model)["hits"] == 0
    second = run(model, batch).last_hidden_state
    layers, rows = len(model.layer_cache.layers), batch["input_ids"].shape[0]
    assert totals(model)["hits"] == layers * rows
    assert_close_on_real_tokens(first, reference, batch["attention_mask"], atol=0)
    assert_close_on_real_tokens(second, reference, batch["attention_mask"])


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("reuse", REUSES)
def test_a_text_twice_in_one_cold_batch_is_computed_once(arch, reuse):
    """#31: each layer computes a repeated row once and copies it (the lookups still count both rows: neither was
    found in the bank)."""
    model = hf_layercache.enable(tiny_model(arch), semantic(reuse=reuse))
    batch = tiny_batch(arch, batch=3)
    twice = {name: torch.cat([t, t[:1]]) for name, t in batch.items()}  # row 3 repeats row 0
    options = {"use_cache": False} if arch == "llama" else {}  # with a KV cache a batch is computed whole
    with model.layer_cache.bypass():
        expected = run(model, twice, **options).last_hidden_state
    served = run(model, twice, **options).last_hidden_state
    layers = model.layer_cache.stats()["layers"].values()
    assert [layer["computed"] for layer in layers] == [3] * len(layers)
    assert totals(model)["misses"] == 4 * len(layers)
    assert torch.equal(served[3], served[0])
    assert_close_on_real_tokens(served, expected, twice["attention_mask"])


def test_rows_with_the_same_tokens_in_other_places_are_both_computed():
    """A twin must have the same input: the same tokens padded differently are two computations."""
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    batch = tiny_batch("bert", batch=2, length=6)
    batch["attention_mask"][0, -2:] = 0
    shifted = {name: t[:1].roll(2, dims=1) for name, t in batch.items()}  # row 0, left-padded
    both = {name: torch.cat([batch[name], shifted[name]]) for name in batch}
    with model.layer_cache.bypass():
        expected = run(model, both).last_hidden_state
    served = run(model, both).last_hidden_state
    assert [layer["computed"] for layer in model.layer_cache.stats()["layers"].values()] == [3] * 3
    assert_close_on_real_tokens(served, expected, both["attention_mask"])


@pytest.mark.parametrize("reuse", REUSES)
def test_dissimilar_input_misses(reuse):
    model = tiny_model("bert")
    hf_layercache.enable(model, semantic(reuse=reuse, fingerprint="minhash", threshold=0.5))
    g = torch.Generator().manual_seed(0)
    low, high = torch.randint(3, 50, (2, 8), generator=g), torch.randint(50, VOCAB, (2, 8), generator=g)
    run(model, {"input_ids": low})
    reference = tiny_model("bert")(input_ids=high).last_hidden_state
    out = run(model, {"input_ids": high}).last_hidden_state
    assert totals(model)["hits"] == 0
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_default_key_is_token_overlap_and_unrelated_inputs_miss_where_mean_embeddings_meet():
    """Long rows of tokens drawn from one small vocabulary have near-equal mean embeddings (the old default key hit
    on them) but share few token pairs: the default key computes them. (``max_unaligned=0`` maps equal lengths
    position to position, so the key alone decides.)"""
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, 30, (2, 64), generator=g) for _ in range(2))
    for fingerprint, served in ((None, False), ("mean_embedding", True)):
        model = tiny_model("bert")
        hf_layercache.enable(model, semantic(reuse="state", fingerprint=fingerprint, max_unaligned=0.0))
        assert isinstance(model.layer_cache.strategy.fingerprint, MinHash if fingerprint is None else MeanEmbedding)
        run(model, {"input_ids": first})
        run(model, {"input_ids": second})
        assert (totals(model)["hits"] > 0) == served


def test_minhash_estimate_is_confirmed_exactly_before_serving():
    """One MinHash slot estimates Jaccard as +1 for about half of all unrelated pairs; the exact check refuses them."""
    g = torch.Generator().manual_seed(0)
    stored, asked = torch.randint(3, VOCAB, (8, 12), generator=g), torch.randint(3, VOCAB, (8, 12), generator=g)
    model = tiny_model("bert")
    hf_layercache.enable(model, semantic(reuse="state", fingerprint_kwargs={"num_perm": 1}))
    keys = model.layer_cache.strategy.fingerprint(torch.cat([stored, asked]), None, torch.zeros(16, 12, 1))
    assert bool((keys[8:] @ keys[:8].T >= 1.0).any())  # some estimates say "identical"
    run(model, {"input_ids": stored})
    reference = run(tiny_model("bert"), {"input_ids": asked}).last_hidden_state
    torch.testing.assert_close(run(model, {"input_ids": asked}).last_hidden_state, reference, rtol=0, atol=1e-6)
    assert totals(model)["hits"] == 0


@pytest.mark.parametrize("reuse", REUSES)
def test_threshold_one_serves_identical_inputs_only(reuse):
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    hf_layercache.enable(model, semantic(reuse=reuse, threshold=1.0))
    run(model, batch)
    run(model, one_token_changed(batch))
    assert totals(model)["hits"] == 0
    run(model, batch)
    assert totals(model)["hits"] > 0


@pytest.mark.parametrize("reuse", REUSES)
def test_similar_input_hits_and_residual_keeps_its_own_information(reuse):
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    changed = one_token_changed(batch)
    reference = run(model, changed).last_hidden_state
    original = run(model, batch).last_hidden_state
    hf_layercache.enable(model, semantic(reuse=reuse, threshold=0.0))
    run(model, batch)
    out = run(model, changed).last_hidden_state
    assert totals(model)["hits"] == len(model.layer_cache.layers)
    assert not torch.equal(out, reference)  # approximate: served from the other input's entries
    if reuse == "state":  # the jump to the last layer returns the other input's answer
        torch.testing.assert_close(out, original, rtol=0, atol=1e-6)
    else:  # residual reuse adds updates to the changed input's own state, so the change shows in the output
        assert not torch.allclose(out, original, atol=1e-4)


def test_state_reuse_jumps_to_the_deepest_layer_that_hits():
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    hf_layercache.enable(model, semantic(reuse="state", threshold=[0.0, 0.0, 1.0]))
    original = run(model, batch).last_hidden_state
    out = run(model, one_token_changed(batch)).last_hidden_state
    hits = [c["hits"] for c in model.layer_cache.stats()["layers"].values()]
    assert hits == [1, 1, 0]  # layer 2 needs an identical input: the row jumps to layer 1 and computes layer 2
    # the approximate row is not stored; layer 0 stores nothing: layer 1 catches whatever it could, being deeper
    assert [len(bank) for bank in model.layer_cache.strategy.banks.values()] == [0, 1, 1]
    torch.testing.assert_close(out, original, rtol=0, atol=1e-6)  # from layer 1 on, the other input's trajectory


@pytest.mark.parametrize("reuse", REUSES)
def test_mixed_batch_computes_new_rows_exactly(reuse):
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=4)
    reference = run(model, batch).last_hidden_state
    hf_layercache.enable(model, semantic(reuse=reuse, threshold=1.0))
    run(model, {k: v[:2] for k, v in batch.items()})
    out = run(model, batch).last_hidden_state
    layers = len(model.layer_cache.layers)
    assert totals(model)["hits"] == 2 * layers
    assert_close_on_real_tokens(out, reference, batch["attention_mask"])


def test_length_mismatch_misses_unless_tokens_align():
    batch = tiny_batch("bert", batch=1, length=10)
    longer = {"input_ids": torch.cat([batch["input_ids"][:, :5], torch.tensor([[7]]), batch["input_ids"][:, 5:]], 1)}
    for max_unaligned, expected in ((0.0, 0), (0.2, 3)):
        fresh = tiny_model("bert")
        hf_layercache.enable(fresh, semantic(fingerprint="minhash", threshold=0.3, max_unaligned=max_unaligned))
        run(fresh, {"input_ids": batch["input_ids"]})
        run(fresh, longer)
        assert totals(fresh)["hits"] == expected


def test_alignment_maps_equal_runs_and_refuses_too_many_insertions():
    assert align_tokens([1, 2, 3], [4, 5, 6], 0.0) == slice(None)  # equal lengths: position to position
    index = align_tokens([1, 2, 9, 3, 4], [1, 2, 3, 4], 0.25)
    assert index.tolist() == [0, 1, 1, 2, 3]  # the inserted token takes its left neighbour's value
    assert align_tokens([1, 2, 9, 8, 3, 4], [1, 2, 3, 4], 0.25) is None
    assert align_tokens([1, 3], [1, 2, 3], 0.2).tolist() == [0, 2]  # a dropped token costs nothing


@pytest.mark.parametrize(("reuse", "checks"), [("residual", 3), ("state", 1)])
def test_verification_feeds_the_policy_and_stats_and_serves_the_computed_result(reuse, checks):
    """Residual checks each hit layer; a state jump is checked once, at the layer it would have jumped to."""
    seen = []

    class Recording(LRUPolicy):
        def on_error(self, entry_id, error):
            seen.append(error)

    register_policy("recording-lru", Recording, overwrite=True)
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    changed = one_token_changed(batch)
    reference = run(model, changed).last_hidden_state
    hf_layercache.enable(model, semantic(reuse=reuse, threshold=0.0, verify_fraction=1.0, policy="recording-lru"))
    run(model, batch)
    out = run(model, changed).last_hidden_state
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)  # every hit verified: the real result is served
    stats = model.layer_cache.stats()
    assert len(seen) == stats["total"]["verified"] == checks
    assert all(e > 0 for e in seen)
    assert stats["total"]["max_error"] == pytest.approx(max(seen))
    assert stats["total"]["hits"] == 0  # computed rows are not counted as served


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("reuse", REUSES)
def test_generate_after_a_semantic_hit(arch, reuse):
    model = tiny_model(arch, tf.AutoModelForCausalLM)
    batch = tiny_batch(arch, padding="left")
    reference = model.generate(**batch, max_new_tokens=5, do_sample=False)
    hf_layercache.enable(model, semantic(reuse=reuse, threshold=0.0))
    model.generate(**batch, max_new_tokens=5, do_sample=False)
    hits = totals(model)["hits"]
    assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False), reference)
    assert totals(model)["hits"] > hits  # the prefill was served
    assert totals(model)["bypassed"] > 0  # decode steps never look up

    changed = one_token_changed(batch)
    hits = totals(model)["hits"]
    out = model.generate(**changed, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert totals(model)["hits"] > hits  # served from the similar prompt's entries
    assert out.sequences.shape == reference.shape
    assert out.past_key_values.get_seq_length() == reference.shape[1] - 1


def test_decoder_with_kv_cache_serves_batches_whole():
    model = tiny_model("llama")
    batch = tiny_batch("llama", batch=4)
    hf_layercache.enable(model, semantic(threshold=1.0))
    run(model, {k: v[:2] for k, v in batch.items()})
    run(model, batch)
    assert totals(model)["hits"] == 0  # two rows are cached, but a KV cache needs all rows served or none


def test_t5_is_refused_and_bad_thresholds_too():
    with pytest.raises(ValueError, match="position biases"):
        hf_layercache.enable(tiny_model("t5"), semantic())
    with pytest.raises(ValueError, match="one per layer"):
        hf_layercache.enable(tiny_model("bert"), semantic(threshold=[0.9, 0.9]))


@pytest.mark.parametrize(
    ("field", "value"),
    [("reuse", "both"), ("verify_fraction", 1.5), ("max_unaligned", -0.1), ("verify_fraction", True)],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LayerCacheConfig(strategy="semantic", **{field: value})


def test_hidden_states_residual_cached_state_bypassed():
    batch = tiny_batch("bert")
    for reuse, bypassed in (("residual", False), ("state", True)):
        model = tiny_model("bert")
        hf_layercache.enable(model, semantic(reuse=reuse, threshold=1.0))
        run(model, batch)
        out = run(model, batch, output_hidden_states=True)
        assert len(out.hidden_states) == 4
        assert (totals(model)["bypassed"] > 0) == bypassed


def test_warm_cache_round_trip(tmp_path):
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    hf_layercache.enable(model, semantic(threshold=0.99))
    run(model, batch)
    model.layer_cache.save(tmp_path)
    warm = tiny_model("bert")
    hf_layercache.enable(warm, semantic(threshold=0.99))
    warm.layer_cache.load(tmp_path)
    reference = run(tiny_model("bert"), batch).last_hidden_state
    out = run(warm, batch).last_hidden_state
    assert totals(warm)["hits"] == 3 * 3
    assert_close_on_real_tokens(out, reference, batch["attention_mask"])


NOTICE = (
    "The water supply to the northern suburbs will be interrupted on Tuesday 14 March between 9:00 and 15:00 while "
    "crews replace a 300 millimetre main under Station Road. Residents are advised to store enough water for the "
    "day; tankers will be parked outside the library and the primary school."
)


@pytest.mark.slow
def test_real_model_resent_document_hits_and_unrelated_or_edited_sentences_miss(minilm_path):
    """The default config on real text: a resend with a greeting put in front is served, close to the truth; the
    resend with its date changed, a sentence with one word changed and an unrelated text of the same kind compute."""
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path)
    model = tf.AutoModel.from_pretrained(minilm_path, layer_cache=LayerCacheConfig(strategy="semantic")).eval()
    plain = tf.AutoModel.from_pretrained(minilm_path).eval()

    def embed(m, text):
        batch = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            return m(**batch).last_hidden_state[0].mean(0)

    embed(model, NOTICE)
    greeted = f"Dear residents, {NOTICE}"  # three tokens put in front of 61: 59 of 64 token pairs shared
    served = embed(model, greeted)
    assert totals(model)["hits"] >= 1
    assert float(torch.cosine_similarity(served, embed(plain, greeted), dim=0)) > 0.95
    hits = totals(model)["hits"]
    embed(model, "The committee approved the new budget for the city's public schools.")
    for text in (
        NOTICE.replace("14 March", "21 March"),  # one token of 61 changed: Jaccard 0.94, but a changed token
        "The committee approved the new budget for the city's private schools.",
        "The gas supply to the eastern suburbs will be restored on Friday after crews finished repairs under "
        "Market Street. Residents who smell gas should leave their homes and call the emergency line at once.",
    ):
        torch.testing.assert_close(embed(model, text), embed(plain, text), rtol=0, atol=1e-5)
    assert totals(model)["hits"] == hits


ONE_WORD_EDITS = [
    ("The committee approved the new budget for the city's public schools.", "public", "private"),
    ("A small dog slept under the kitchen table all afternoon.", "dog", "cat"),
    ("The museum will stay open late on Thursdays during the summer.", "Thursdays", "Fridays"),
    ("She finished the marathon in just under four hours.", "four", "five"),
    ("The bridge was closed after the storm damaged its supports.", "closed", "reopened"),
    ("Our flight to Lisbon was delayed by two hours this morning.", "delayed", "moved"),
    ("The new library has more than a million books on its shelves.", "million", "thousand"),
    ("He always drinks his coffee black with no sugar.", "black", "sweet"),
    ("The company reported record profits for the third quarter.", "profits", "losses"),
    ("Heavy rain is expected across the region over the weekend.", "rain", "snow"),
    ("The students were asked to read two chapters before the exam.", "read", "write"),
    ("The old castle on the hill attracts thousands of visitors each year.", "castle", "church"),
]


@pytest.mark.slow
def test_sentence_transformers_one_word_edits_are_never_served_far_from_the_truth(minilm_path):
    """Through sentence-transformers, as a user loads it: every served embedding of a sentence with one word changed
    stays within cosine 0.95 of the uncached one. The mean-embedding key serving any edit (the default before
    2026-12-01) serves them below."""
    from sentence_transformers import SentenceTransformer

    from hf_layercache.cli.demo import DEMO_SIMILAR, DEMO_TEXTS

    originals = DEMO_TEXTS + [text for text, _, _ in ONE_WORD_EDITS]
    edits = DEMO_SIMILAR + [text.replace(old, new) for text, old, new in ONE_WORD_EDITS]
    plain = SentenceTransformer(minilm_path, device="cpu")
    truth = plain.encode(edits, convert_to_tensor=True)
    lowest = {}
    for name, config in (
        ("default", LayerCacheConfig(strategy="semantic")),
        ("mean_embedding", LayerCacheConfig(strategy="semantic", fingerprint="mean_embedding", edits="any")),
    ):
        cached = SentenceTransformer(minilm_path, device="cpu", model_kwargs={"layer_cache": config})
        cached.encode(originals)
        layer_cache = cached[0].auto_model.layer_cache
        before = layer_cache.stats()["total"]["hits"]
        served = cached.encode(edits, convert_to_tensor=True)
        lowest[name] = float(torch.cosine_similarity(served, truth).min())
        cached.encode(originals)  # the cache is in use: resent originals are served
        assert layer_cache.stats()["total"]["hits"] > before
    assert lowest["default"] >= 0.95
    assert lowest["mean_embedding"] < 0.95


@pytest.mark.parametrize("backend", ["exact", "faiss", "annoy"])
def test_entries_stored_under_inference_mode_can_be_updated_and_cleared_outside_it(backend):
    """Pipelines run under ``torch.inference_mode()``; a later plain call, a verdict recorded in an entry, or
    ``clear()`` runs outside it, where in-place updates of inference tensors are refused. Banks own normal tensors."""
    model = tiny_model("bert")
    batch = tiny_batch("bert", batch=1)
    config = semantic(backend=backend, max_error_rate=0.05, verify_fraction=0.0, threshold=0.0)
    hf_layercache.enable(model, config)
    with torch.inference_mode():
        run(model, batch)
    for offset in range(3):  # explored: the verdict is recorded in place in an entry stored under inference mode
        changed = {k: v.clone() for k, v in batch.items()}
        changed["input_ids"][:, 2] = (changed["input_ids"][:, 2] + 1 + offset) % (VOCAB - 3) + 3
        run(model, changed)
    assert model.layer_cache.stats()["total"]["explored"] == 3
    with torch.inference_mode():
        run(model, one_token_changed(batch))
    model.layer_cache.clear()
    assert model.layer_cache.stats()["total"]["entries"] == 0


# --- where the tokens sit -----------------------------------------------------------------------------------------
def two_texts(side: str) -> dict:
    """A 10-token text and a 6-token one, padded on ``side``: the short one's tokens sit 4 columns later on the left."""
    g = torch.Generator().manual_seed(1)
    long, short = torch.randint(3, VOCAB, (10,), generator=g), torch.randint(3, VOCAB, (6,), generator=g)
    ids, mask = torch.zeros(2, 10, dtype=torch.long), torch.zeros(2, 10, dtype=torch.long)
    ids[0], mask[0] = long, 1
    where = slice(0, 6) if side == "right" else slice(4, 10)
    ids[1, where], mask[1, where] = short, 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("reuse", REUSES)
@pytest.mark.parametrize(("first", "then"), [("right", "left"), ("left", "right")])
def test_a_text_at_other_positions_is_computed_not_served(reuse, first, then):
    """BERT adds absolute position embeddings: the same tokens four columns later compute other states (on the tiny
    model up to 2.3 apart), so neither padding side may serve the other's entries."""
    model = tiny_model("bert")
    hf_layercache.enable(model, semantic(reuse=reuse))
    run(model, two_texts(first))
    batch = two_texts(then)
    out = run(model, batch).last_hidden_state
    with model.layer_cache.bypass():
        reference = run(model, batch).last_hidden_state
    assert_close_on_real_tokens(out, reference, batch["attention_mask"])
    layers = len(model.layer_cache.layers)
    assert totals(model)["hits"] == layers  # the unpadded text, at the same positions both times, is served


@pytest.mark.parametrize("reuse", REUSES)
def test_position_ids_decide_where_the_tokens_sit(reuse):
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    length = batch["input_ids"].shape[1]
    hf_layercache.enable(model, semantic(reuse=reuse))
    run(model, batch)
    shifted = {**batch, "position_ids": torch.arange(length).unsqueeze(0) + 3}
    out = run(model, shifted).last_hidden_state
    with model.layer_cache.bypass():
        reference = run(model, shifted).last_hidden_state
    assert_close_on_real_tokens(out, reference, batch["attention_mask"])
    assert totals(model)["hits"] == 0
    run(model, {**batch, "position_ids": torch.arange(length).unsqueeze(0)})  # the columns, said explicitly
    assert totals(model)["hits"] == len(model.layer_cache.layers) * batch["input_ids"].shape[0]


def test_left_padded_generate_still_hits():
    """``generate()`` numbers each row's real tokens from 0 whatever its padding: a repeated left-padded batch hits."""
    model = tiny_model("llama", tf.AutoModelForCausalLM)
    hf_layercache.enable(model, LayerCacheConfig(strategy="semantic"))
    batch = two_texts("left")
    settings = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    first = model.generate(**batch, **settings)
    hits = totals(model)["hits"]
    assert torch.equal(model.generate(**batch, **settings), first)
    assert totals(model)["hits"] > hits


@pytest.mark.parametrize("edits", ["additive", "any"])
def test_a_decoder_never_borrows_a_state_for_a_token_the_entry_lacks(edits):
    """``generate(use_cache=False)`` runs the whole sequence again at every step, one token longer than the step
    before: the new token is where the next one is predicted from, and a causal layer's state for it exists in no
    entry. (Served an estimate, greedy decoding repeated one token: [33, 68, 68, 68, 68, 68] for [33, 64, 52, ...].)"""
    model = tiny_model("llama", tf.AutoModelForCausalLM)
    hf_layercache.enable(model, LayerCacheConfig(strategy="semantic", edits=edits))
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "use_cache": False}
    with model.layer_cache.bypass():
        truth = model.generate(input_ids=ids, **settings)
    assert torch.equal(model.generate(input_ids=ids, **settings), truth)
    assert torch.equal(model.generate(input_ids=ids, **settings), truth)
    assert totals(model)["hits"] > 0  # the repeated steps, token for token, are still served


# --- what else a call passes --------------------------------------------------------------------------------------
def test_token_types_are_part_of_a_rows_tokens():
    """A cross-encoder's pair: BERT adds a type embedding per token, so the same ids with other types compute other
    states (2.3 apart on the tiny model when they were served each other's)."""
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    pair = torch.zeros_like(batch["input_ids"])
    pair[:, 4:] = 1
    hf_layercache.enable(model, semantic())
    run(model, {**batch, "token_type_ids": torch.zeros_like(pair)})
    out = run(model, {**batch, "token_type_ids": pair}).last_hidden_state
    with model.layer_cache.bypass():
        reference = run(model, {**batch, "token_type_ids": pair}).last_hidden_state
    assert_close_on_real_tokens(out, reference, batch["attention_mask"])
    assert totals(model)["hits"] == 0
    run(model, {**batch, "token_type_ids": pair})
    assert totals(model)["hits"] == len(model.layer_cache.layers) * batch["input_ids"].shape[0]


def test_a_call_with_a_tensor_the_tokens_do_not_show_computes():
    """States to cross-attend to (or an image's pixels) change what the layers compute for the same token ids."""
    config = tiny_model("bert").config
    config.is_decoder, config.add_cross_attention = True, True
    model = tf.BertModel(config).eval()
    hf_layercache.enable(model, semantic())
    batch = tiny_batch("bert")
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        encoded = torch.randn(batch["input_ids"].shape[0], 5, config.hidden_size, generator=g)
        call = {**batch, "encoder_hidden_states": encoded, "use_cache": False}
        out = run(model, call).last_hidden_state
        with model.layer_cache.bypass():
            reference = run(model, call).last_hidden_state
        assert_close_on_real_tokens(out, reference, batch["attention_mask"])
    assert totals(model)["hits"] == 0
