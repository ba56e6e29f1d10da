"""Partial semantic hits (issue #33): a row that adds tokens at its ends to a cached entry's takes the entry's
states for those tokens and computes only the added ones, against the entry's keys and values in every layer.

The reference is built here from the model's own layers on full sequences, not from the library's code: in a
bidirectional layer an added token's output depends on its own input and on every token's key and value, so
running the layer over ``[entry's inputs at that layer; the added tokens' inputs]`` and keeping the added tokens'
outputs is what a partial call must give.
"""

import pytest
import torch
import transformers as tf
from tiny import VOCAB, tiny_decoder, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.strategies.semantic import partial
from hf_layercache.strategies.semantic.entries import SemanticEntry
from hf_layercache.strategies.semantic.partial import RecordingGate, supports_partial

CLS, SEP = 1, 2
ENTRY = [CLS, *torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(7)).tolist(), SEP]
GREETING = [CLS, 11, 12, *ENTRY[1:]]
"""Two tokens put in front (after ``[CLS]``)."""
REFERENCE = [*ENTRY[:-1], 21, 22, 23, SEP]
"""Three tokens appended (before ``[SEP]``)."""


def semantic(**kwargs) -> LayerCacheConfig:
    return LayerCacheConfig(strategy="semantic", **{"verify_fraction": 0.0, "threshold": 0.5, **kwargs})


def forward(model, rows: list[list[int]]):
    """The model on ``rows``, right-padded into one batch; last hidden states."""
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def layer_out(layer, x: torch.Tensor) -> torch.Tensor:
    out = layer(x.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out)[0]


def near(added: list[int], length: int) -> list[int]:
    """The positions a partial hit computes: the added ones and the entry's tokens right next to them (the two whose
    states an addition moves most: a ``[SEP]`` after an appended reference, a ``[CLS]`` before a greeting)."""
    return sorted({p + d for p in added for d in (-1, 0, 1) if 0 <= p + d < length})


def partial_reference(plain, entry: list[int], row: list[int], added: list[int]) -> torch.Tensor:
    """What a partial hit serves ``row``: the entry's last states at its tokens, and the ``added`` positions with
    their neighbours computed layer by layer against the entry's inputs there, less the neighbours' own (the row
    without its added tokens is the entry, in order). Both at positions from 0, where entries and the rows they
    serve compute (a row placed elsewhere computes whole)."""
    computed = near(added, len(row))
    aligned = [p for p in range(len(row)) if p not in added]  # the entry's tokens, in order
    in_entry = dict(zip(aligned, range(len(entry)), strict=True))
    kept = [in_entry[p] for p in aligned if p not in computed]
    with torch.no_grad():
        states = plain(input_ids=torch.tensor([entry]), output_hidden_states=True).hidden_states
        x = plain.embeddings(input_ids=torch.tensor([row]))[0][computed]
        for i, layer in enumerate(plain.encoder.layer):
            x = layer_out(layer, torch.cat([states[i][0][kept], x]))[-len(computed) :]
    out = torch.empty(len(row), x.shape[-1])
    served = [p for p in aligned if p not in computed]
    out[served] = states[-1][0][kept]
    out[computed] = x
    return out


def entries(model) -> list[SemanticEntry]:
    return [entry for bank in model.layer_cache.strategy.banks.values() for _, entry in bank.items()]


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_added_tokens_are_computed_against_the_entry_and_the_rest_served(arch):
    plain = tiny_model(arch)
    model = hf_layercache.enable(tiny_model(arch), semantic())
    forward(model, [ENTRY])
    for row, added in ((GREETING, [1, 2]), (REFERENCE, [41, 42, 43])):
        served = forward(model, [row])[0]
        torch.testing.assert_close(served, partial_reference(plain, ENTRY, row, added), rtol=0, atol=1e-5)
        assert not torch.allclose(served, forward(plain, [row])[0], atol=1e-3)  # served, not computed
    assert model.layer_cache.stats()["total"]["hits"] == 2 * len(model.layer_cache.layers)


def test_a_padded_batch_mixing_partial_whole_and_computed_rows_gives_each_row_its_own_result():
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    forward(model, [ENTRY])
    unrelated = [CLS, *range(50, 70), SEP]
    out = forward(model, [REFERENCE, unrelated, ENTRY, GREETING])
    torch.testing.assert_close(out[0], partial_reference(plain, ENTRY, REFERENCE, [41, 42, 43]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, : len(unrelated)], forward(plain, [unrelated])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2, : len(ENTRY)], forward(plain, [ENTRY])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        out[3, : len(GREETING)], partial_reference(plain, ENTRY, GREETING, [1, 2]), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("bound", [1, 80, 512])
def test_rows_of_different_entries_packed_into_call_rows_each_attend_to_their_own_entry(bound, monkeypatch):
    """Three rows served in part from two entries of different lengths, packed one per call row (bound 1), two then
    one (80 entry tokens), or all in one (512): each row's added tokens see only their own entry and additions."""
    monkeypatch.setattr(partial, "BIN_STORED_TOKENS", bound)
    other = [CLS, *torch.randint(3, VOCAB, (28,), generator=torch.Generator().manual_seed(8)).tolist(), SEP]
    other_greeting = [CLS, 13, 14, 15, *other[1:]]
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    forward(model, [ENTRY])
    forward(model, [other])
    out = forward(model, [REFERENCE, other_greeting, GREETING])
    expected = [
        partial_reference(plain, ENTRY, REFERENCE, [41, 42, 43]),
        partial_reference(plain, other, other_greeting, [1, 2, 3]),
        partial_reference(plain, ENTRY, GREETING, [1, 2]),
    ]
    for i, reference in enumerate(expected):
        torch.testing.assert_close(out[i, : len(reference)], reference, rtol=0, atol=1e-5)
    assert model.layer_cache.stats()["total"]["partial_hits"] == 3 * len(model.layer_cache.layers)


def test_left_padding_serves_the_row_where_its_tokens_sit():
    """Left-padded, with position ids numbering each row's real tokens from 0 (as ``generate()`` does): the row is
    served at the columns its tokens sit in, the states it gets unpadded. (Without position ids BERT numbers the
    padding too and the row computes: tests/test_semantic.py. With them transformers hands the layers the position
    ids, which a partial call does not cut, so rows are served whole here.)"""
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    forward(model, [ENTRY])
    pad = len(REFERENCE) - len(GREETING)
    ids = torch.tensor([REFERENCE, [0] * pad + GREETING])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[0], [pad]])).long()
    with torch.no_grad():
        left = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        alone = model(input_ids=torch.tensor([GREETING]), position_ids=torch.arange(len(GREETING)).unsqueeze(0))
    torch.testing.assert_close(left.last_hidden_state[1, pad:], alone.last_hidden_state[0], rtol=0, atol=1e-5)
    assert model.layer_cache.stats()["total"]["hits"] == 3 * len(model.layer_cache.layers)


def test_entries_hold_every_layers_keys_and_values_and_survive_a_save(tmp_path):
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    forward(model, [ENTRY])
    (entry,) = entries(model)  # one threshold: the last layer alone stores
    config = plain.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    assert tuple(entry.attention_kv.shape) == (config.num_hidden_layers, 2, heads, len(ENTRY), head_dim)
    model.layer_cache.save(tmp_path)
    warm = hf_layercache.enable(tiny_model("bert"), semantic())
    warm.layer_cache.load(tmp_path)
    served = forward(warm, [REFERENCE])[0]
    torch.testing.assert_close(served, partial_reference(plain, ENTRY, REFERENCE, [41, 42, 43]), rtol=0, atol=1e-5)


def test_stored_keys_and_values_of_the_wrong_shape_are_refused():
    entry = SemanticEntry(
        kind="state",
        value=torch.zeros(5, 8),
        tokens=torch.arange(5),
        source=bytes(32),
        kv_recorded=False,
        writes=[],
        attention_kv=torch.zeros(3, 2, 2, 4, 4),  # 4 tokens for 5 states
    )
    with pytest.raises(ValueError, match="attention_kv"):
        SemanticEntry.validate(entry.to_tensors(), hidden_size=8)


def test_stats_count_partial_hits_and_leave_their_computed_share_out_of_the_seconds_saved():
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    forward(model, [ENTRY])
    forward(model, [ENTRY])  # a whole hit
    whole = model.layer_cache.stats()["layers"]
    forward(model, [REFERENCE])  # 3 of 45 tokens added, 5 computed with their neighbours
    after = model.layer_cache.stats()
    assert after["total"]["partial_hits"] == len(model.layer_cache.layers)
    for name, layer in after["layers"].items():
        assert layer["hits"] == 2 and layer["partial_hits"] == 1
        saved_whole = whole[name]["seconds_saved"]
        saved_partial = layer["seconds_saved"] - saved_whole
        assert saved_partial == pytest.approx(saved_whole * (1 - len(near([41, 42, 43], 45)) / 45), rel=1e-6)


def test_max_added_zero_serves_whole_rows_and_stores_no_keys():
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic(max_added=0.0))
    forward(model, [ENTRY])
    assert all(entry.attention_kv is None for entry in entries(model))
    served = forward(model, [GREETING])[0]  # 2 of 44 tokens added: within max_unaligned, served whole
    assert model.layer_cache.stats()["total"]["hits"] == len(model.layer_cache.layers)
    assert not torch.allclose(served, partial_reference(plain, ENTRY, GREETING, [1, 2]), atol=1e-3)


def test_a_row_holding_the_whole_entry_is_served_in_part_below_the_threshold_its_additions_cost():
    """Eight tokens appended to the entry's 42: the rows share 40 of 50 token pairs (0.80, under the default
    threshold 0.85) but the row holds 40 of the entry's 41 (0.98), and only those are served."""
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic(threshold=0.85))
    forward(model, [ENTRY])
    row = [*ENTRY[:-1], *range(30, 38), SEP]
    served = forward(model, [row])[0]
    torch.testing.assert_close(served, partial_reference(plain, ENTRY, row, list(range(41, 49))), rtol=0, atol=1e-5)
    assert model.layer_cache.stats()["total"]["hits"] == len(model.layer_cache.layers)
    short = [*ENTRY[:30], *range(30, 38), SEP]  # an entry's tokens dropped: computed, whatever it shares
    torch.testing.assert_close(forward(model, [short])[0], forward(plain, [short])[0], rtol=0, atol=1e-5)
    assert model.layer_cache.stats()["total"]["hits"] == len(model.layer_cache.layers)


def test_whole_hits_still_need_the_threshold():
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic(threshold=0.85, max_added=0.0, max_unaligned=0.5))
    forward(model, [ENTRY])
    row = [*ENTRY[:-1], *range(30, 38), SEP]  # 0.80 of the pairs shared: under the threshold
    torch.testing.assert_close(forward(model, [row])[0], forward(plain, [row])[0], rtol=0, atol=1e-5)
    assert model.layer_cache.stats()["total"]["hits"] == 0


def test_more_added_than_max_added_and_max_unaligned_computes():
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic(max_added=0.05, max_unaligned=0.05))  # 3 of 45 added
    forward(model, [ENTRY])
    torch.testing.assert_close(forward(model, [REFERENCE])[0], forward(plain, [REFERENCE])[0], rtol=0, atol=1e-5)
    assert model.layer_cache.stats()["total"]["hits"] == 0


def test_only_bidirectional_layers_with_a_kv_argument_qualify():
    assert supports_partial(tiny_model("bert").encoder.layer[0])
    assert not supports_partial(tiny_decoder("llama").model.layers[0])  # causal: a served token would see the future
    assert not supports_partial(tiny_model("distilbert").transformer.layer[0])  # no KV-cache argument


def test_a_row_twice_in_a_cold_batch_still_stores_its_keys_and_values():
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    forward(model, [ENTRY, ENTRY])  # computed once and copied
    assert all(entry.attention_kv is not None for entry in entries(model))
    served = forward(model, [REFERENCE])[0]
    torch.testing.assert_close(served, partial_reference(plain, ENTRY, REFERENCE, [41, 42, 43]), rtol=0, atol=1e-5)


def test_an_audited_partial_hit_serves_the_computed_row_and_is_judged_on_the_tokens_it_would_serve():
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic(verify_fraction=1.0))
    forward(model, [ENTRY])
    torch.testing.assert_close(forward(model, [REFERENCE])[0], forward(plain, [REFERENCE])[0], rtol=0, atol=1e-5)
    total = model.layer_cache.stats()["total"]
    assert total["audited"] == 1


def test_the_recording_gate_shuts_when_rows_stop_finding_entries_and_opens_when_they_find_them_again():
    gate = RecordingGate(share=0.05, rows=64)
    assert gate.open  # no evidence yet: record
    for _ in range(12):
        gate.observe(0, 16)
    assert not gate.open  # 192 rows found nothing
    gate.observe(4, 16)
    assert gate.open  # a quarter of a batch found entries


def test_unrelated_traffic_stops_recording_keys_and_values():
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    generator = torch.Generator().manual_seed(3)
    for _ in range(14):
        forward(model, [[CLS, *torch.randint(3, VOCAB, (30,), generator=generator).tolist(), SEP] for _ in range(16)])
    assert not model.layer_cache.strategy.reuse_step.recording.open
    forward(model, [ENTRY])
    (stored,) = [entry for entry in entries(model) if entry.tokens.tolist() == ENTRY]
    assert stored.attention_kv is None  # stored while the gate was shut: served whole, as before


NOTICE = (
    "The water supply to the northern suburbs will be interrupted on Tuesday between nine and three while crews "
    "replace a main under Station Road. Residents are advised to store enough water for the day; tankers will be "
    "parked outside the library and the primary school."
)


@pytest.mark.slow
def test_sentence_transformers_serves_a_resent_notice_with_a_reference_in_part(minilm_path):
    """Through sentence-transformers on the real all-MiniLM-L6-v2: the notice resent with a reference id (6 of 57
    tokens added, above ``max_unaligned``) is served in part, closer to its own embedding than the original's
    embedding is (what serving the row whole gives: 0.973-0.990 here, partial 0.985-0.993). Threshold 0.8: the pair
    shares 0.857 of its token pairs, which the MinHash estimate may read below the default 0.85."""
    from sentence_transformers import SentenceTransformer

    resent = [f"{NOTICE} Ref: AK-{n:05d}" for n in (10442, 73019, 55120)]
    plain = SentenceTransformer(minilm_path, device="cpu")
    truth, original = plain.encode(resent, convert_to_tensor=True), plain.encode([NOTICE], convert_to_tensor=True)
    cached = SentenceTransformer(
        minilm_path, device="cpu", model_kwargs={"layer_cache": LayerCacheConfig(strategy="semantic", threshold=0.8)}
    )
    cached.encode([NOTICE])
    layer_cache = cached[0].auto_model.layer_cache
    served = cached.encode(resent, convert_to_tensor=True)
    assert layer_cache.stats()["total"]["hits"] == len(resent) * len(layer_cache.layers)  # jumps pass every layer
    cosine = torch.cosine_similarity(served, truth)
    assert float(cosine.min()) >= 0.97
    assert bool((cosine > torch.cosine_similarity(original, truth)).all())  # the added tokens' information is in


class LayerIgnoringItsCache(tf.models.bert.modeling_bert.BertLayer):
    """A layer that takes a KV-cache argument and never reads it, as another version of a model's code might."""

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        return super().forward(hidden_states, attention_mask, **kwargs)


def test_entries_with_keys_and_values_refuse_a_layer_that_ignores_them(tmp_path):
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    forward(model, [ENTRY])
    model.layer_cache.save(tmp_path)
    other = tiny_model("bert")
    for layer in other.encoder.layer:
        layer.__class__ = LayerIgnoringItsCache
    other = hf_layercache.enable(other, semantic())
    forward(other, [[CLS, *range(60, 90), SEP]])  # its own rows record nothing: the layer never reads the argument
    assert all(entry.attention_kv is None for entry in entries(other))
    other.layer_cache.load(tmp_path)
    with pytest.raises(RuntimeError, match="ignored the KV-cache argument"):
        forward(other, [REFERENCE])
