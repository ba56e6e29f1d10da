"""Rows that compute in a batch where others are served: in groups of similar length, each cut to the columns its
rows use (``strategies/semantic/subbatch.py``). What a row computes must not depend on the group it lands in."""

import torch
from test_semantic_partial import CLS, ENTRY, SEP, forward, partial_reference, semantic
from tiny import tiny_model

import hf_layercache
from hf_layercache.strategies.semantic.subbatch import CALL_COST_TOKENS, Group, cut_columns, groups, span


def right_padded(lengths: list[int]) -> dict[int, tuple[int, int]]:
    return {row: (0, length) for row, length in enumerate(lengths)}


def test_rows_of_very_different_lengths_are_split_and_similar_ones_kept_together():
    assert groups([0, 1, 2, 3], right_padded([10, 60, 12, 62])) == [Group([0, 2], 0, 12), Group([1, 3], 0, 62)]
    assert groups([0, 1], right_padded([60, 61])) == [Group([0, 1], 0, 61)]  # one token: not worth a call
    assert groups([2], right_padded([5, 5, 40])) == [Group([2], 0, 40)]


def test_a_split_is_made_only_when_the_padding_it_saves_pays_for_the_call():
    short, long = 20, 20 + CALL_COST_TOKENS  # a split saves `long - short` padded tokens of one row
    assert len(groups([0, 1], right_padded([short, long]))) == 1
    assert len(groups([0, 1], right_padded([short, long + 1]))) == 2


def test_left_padded_rows_keep_their_columns():
    spans = {0: (50, 64), 1: (4, 64), 2: (52, 64)}  # a batch of 64 columns, padded on the left
    assert groups([0, 1, 2], spans) == [Group([0, 2], 50, 64), Group([1], 4, 64)]


def test_a_row_spans_its_first_to_its_last_real_token():
    assert span(slice(3, 9), 12) == (3, 9)
    assert span(slice(0, None), 12) == (0, 12)
    assert span(torch.tensor([1, 2, 5]), 12) == (1, 6)  # a mask with a hole: the hole computes too
    assert span(torch.tensor([], dtype=torch.long), 12) == (0, 1)  # no real token: one column, as a call needs


def test_masks_are_cut_on_every_sequence_axis_and_unknown_shapes_are_refused():
    hidden = torch.randn(2, 10, 4)
    for mask, shape in (
        (torch.ones(2, 10), (2, 6)),
        (torch.ones(2, 1, 1, 10), (2, 1, 1, 6)),
        (torch.ones(2, 1, 10, 10), (2, 1, 6, 6)),
    ):
        cut = cut_columns({"hidden_states": hidden, "attention_mask": mask}, "hidden_states", 2, 8)
        assert tuple(cut["hidden_states"].shape) == (2, 6, 4) and tuple(cut["attention_mask"].shape) == shape
    assert (
        cut_columns({"hidden_states": hidden, "attention_mask": torch.ones(2, 10, 10)}, "hidden_states", 2, 8) is None
    )
    whole = {"hidden_states": hidden, "attention_mask": None}
    assert cut_columns(whole, "hidden_states", 0, 10) is whole


def test_computed_rows_of_a_mixed_batch_equal_the_model_whatever_their_group():
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    forward(model, [ENTRY])
    g = torch.Generator().manual_seed(3)
    rows = [ENTRY, *([CLS, *torch.randint(50, 90, (n,), generator=g).tolist(), SEP] for n in (6, 50, 8, 48))]
    lengths = []
    attention = model.encoder.layer[0].attention
    record = hf_layercache.value_neutral_hook(lambda m, args, kw: lengths.append(args[0].shape[1]))
    handle = attention.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = forward(model, rows)
    finally:
        handle.remove()
    assert sorted(lengths) == [10, 52]  # two groups, each cut to its longest row
    for i, row in enumerate(rows[1:], start=1):
        torch.testing.assert_close(out[i, : len(row)], forward(plain, [row])[0], rtol=0, atol=1e-5)
    short = rows[1]
    longer = [*short[:-1], 91, 92, SEP]  # an entry stored from a cut call serves its K/V to a partial hit
    torch.testing.assert_close(
        forward(model, [longer])[0], partial_reference(plain, short, longer, [7, 8]), rtol=0, atol=1e-5
    )


def test_left_padded_computed_rows_equal_the_model():
    plain = tiny_model("bert")
    model = hf_layercache.enable(tiny_model("bert"), semantic())
    forward(model, [ENTRY])
    entries = model.layer_cache.stats()["total"]["entries"]
    g = torch.Generator().manual_seed(4)
    rows = [ENTRY, *([CLS, *torch.randint(50, 90, (n,), generator=g).tolist(), SEP] for n in (5, 30))]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        reference = plain(input_ids=ids, attention_mask=mask).last_hidden_state  # BERT numbers positions from column 0
    for i, row in enumerate(rows[1:], start=1):
        torch.testing.assert_close(out[i, width - len(row) :], reference[i, width - len(row) :], rtol=0, atol=1e-5)
    # their tokens sat at positions from 5 and 30 (BERT numbers the padding): no entry was made of them, so a
    # right-padded row holding the short one computes whole
    assert model.layer_cache.stats()["total"]["entries"] == entries
    longer = [*rows[1][:-1], 91, 92, SEP]
    torch.testing.assert_close(forward(model, [longer])[0], forward(plain, [longer])[0], rtol=0, atol=1e-5)
