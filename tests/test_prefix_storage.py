"""The prefix bank's block storage: slabs grow with the blocks stored, never past the budget (issue #30).

Slab bytes are measured from the entries themselves (the distinct storages their tensors are views of), so the
measure does not rely on the storage's own account; the storage's account is checked against it.
"""

import pytest
import torch
import transformers as tf
from tiny import VOCAB, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig

BLOCK = 4


@pytest.fixture(autouse=True)
def inference():
    with torch.no_grad():
        yield


def cached(**config):
    model = tiny_model("llama", tf.AutoModelForCausalLM)
    return hf_layercache.enable(model, LayerCacheConfig(**{"strategy": "prefix", "block_size": BLOCK, **config}))


def prompt(blocks, seed):
    return torch.randint(3, VOCAB, (1, blocks * BLOCK), generator=torch.Generator().manual_seed(seed))


def slab_bytes(bank):
    """Bytes of the distinct storages the entries' states live in."""
    storages = {}
    for _, block in bank.items():
        for t in (block.key, block.value, block.hidden):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def assert_lossless(model, ids):
    """``ids`` served from the cache (some tokens reused) equal uncached logits within the prefix tolerance."""
    hits = model.layer_cache.stats()["total"]["hits"]
    out = model(input_ids=ids).logits
    assert model.layer_cache.stats()["total"]["hits"] > hits
    with model.layer_cache.bypass():
        reference = model(input_ids=ids).logits
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-4)


def test_storage_grows_with_the_blocks_stored_not_with_max_entries():
    model = cached()  # default max_entries (10,000) and no max_memory: nothing may be sized for them up front
    bank = model.layer_cache.strategy.bank
    slot = bank.storage.slot_bytes(torch.float32)
    stored = 0
    for seed, blocks in enumerate([1, 2, 3, 5]):
        model(input_ids=prompt(blocks, seed))
        stored += blocks
        assert len(bank) == stored
        assert stored * slot <= slab_bytes(bank) < 2 * stored * slot
        assert bank.storage.allocated_bytes == slab_bytes(bank)
    assert_lossless(model, prompt(5, 3))


def test_a_warm_cache_loads_into_slabs_of_its_size(tmp_path):
    model = cached()
    for seed in range(3):
        model(input_ids=prompt(2, seed))
    model.layer_cache.save(tmp_path)
    warm = cached()
    warm.layer_cache.load(tmp_path)
    bank = warm.layer_cache.strategy.bank
    assert len(bank) == 6
    assert slab_bytes(bank) < 2 * 6 * bank.storage.slot_bytes(torch.float32)
    assert_lossless(warm, prompt(2, 1))


@pytest.mark.parametrize("bound", ["max_memory", "max_entries"])
def test_storage_never_exceeds_the_budget_when_filled_past_it(bound):
    """A byte budget caps the slabs at the slots it pays for; ``max_entries`` at that many slots, where every new
    block waits for the slot its eviction frees."""
    limits = {"max_memory": 40_000} if bound == "max_memory" else {"max_entries": 3}
    model = cached(**limits)
    bank = model.layer_cache.strategy.bank
    slot = bank.storage.slot_bytes(torch.float32)
    cap = limits.get("max_memory", 3 * slot)
    stored = 0
    for seed in range(10):
        model(input_ids=prompt(3, seed))
        stored += 3
        assert slab_bytes(bank) <= cap
        assert bank.nbytes <= limits.get("max_memory", bank.nbytes) and len(bank) <= limits.get("max_entries", stored)
    assert len(bank) < stored  # evictions happened
    assert bank.storage.allocated_bytes <= cap
    for _, block in bank.items():  # every entry in a slot, none left waiting in tensors of its own
        assert block.key.untyped_storage().data_ptr() in bank.storage._slab_storages
    assert_lossless(model, prompt(3, 9))


@pytest.mark.parametrize("value", [0, -4, 1025, 10**9, 2.0, True, "16", None])
def test_block_size_out_of_range_is_refused_when_the_config_is_built(value):
    with pytest.raises(ValueError, match=rf"block_size must be an int from 1 to 1024, got {value!r}"):
        LayerCacheConfig(strategy="prefix", block_size=value)
    for fine in (1, 1024):
        assert LayerCacheConfig(strategy="prefix", block_size=fine).block_size == fine


def test_a_budget_too_small_for_one_block_is_refused_at_enable():
    """Every block would be refused and the cache never hit: said at ``enable``, naming both fields."""
    with pytest.raises(ValueError, match=r"block_size=64 tokens, 32,768 bytes .* max_memory=4000"):
        cached(block_size=64, max_memory=4000)  # 3 layers x 2 heads x 64 tokens x 8 x 4 bytes x 2 + 64 x 32 x 4
    assert cached(block_size=BLOCK, max_memory=4000).layer_cache.strategy.bank.max_bytes == 4000


@pytest.mark.parametrize("tokens", [64, 60], ids=["whole-block", "partial-block"])
def test_blocks_larger_than_one_threads_copy_are_copied_exactly_in_pieces(tokens):
    """A slot is filled in pieces of at most 32,768 elements (so torch copies each on one thread): every piece
    lands where it belongs, in whole and partial blocks alike."""
    from hf_layercache.strategies.prefix.block import BlockShape
    from hf_layercache.strategies.prefix.slots import SlotStorage

    shape = BlockShape(n_layers=5, kv_heads=4, head_dim=32, hidden_size=1024, block_size=64)  # 40,960 per key
    storage = SlotStorage(shape, None, None, None, None)
    g = torch.Generator().manual_seed(0)
    kv = shape.kv(tokens)
    block = {
        "key": torch.randn(kv, generator=g),
        "value": torch.randn(kv, generator=g),
        "hidden": torch.randn(tokens, 1024, generator=g),
        "tokens": torch.arange(tokens),
        "parent": torch.zeros(16, dtype=torch.uint8),
    }
    values, _, _ = storage.place(storage.prepare(dict(block)))
    assert values["key"].numel() > 32768
    for name in ("key", "value", "hidden"):
        assert values[name].untyped_storage().data_ptr() in storage._slab_storages
        assert torch.equal(values[name], block[name])


@pytest.mark.parametrize("window", ["one block", "whole rows"])
def test_blocks_gathered_through_the_reused_buffer_serve_exactly(monkeypatch, window):
    """A call's new blocks are gathered into one buffer every store reuses, a window of columns at a time (a whole
    row by default; one block when the window is that small): over left-padded rows of different lengths, and after
    a later store has overwritten the buffer, every stored block serves its prompt exactly."""
    from hf_layercache.strategies.prefix import store

    if window == "one block":
        monkeypatch.setattr(store, "_GATHER_BYTES", 1)
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached()
    rows = [prompt(3, 20)[0, :-1], prompt(1, 21)[0]]  # 11 and 4 tokens: 3 blocks (one partial) and 1
    width = max(len(r) for r in rows)
    ids, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert len(model.layer_cache.strategy.bank) == 4
    model(input_ids=prompt(4, 22))  # its blocks go through the same buffer
    for row in rows:
        extended = torch.cat([row, torch.tensor([5, 6])])[None]  # every block of the row is reused
        hits = model.layer_cache.stats()["total"]["hits"]
        out = model(input_ids=extended).logits
        assert model.layer_cache.stats()["total"]["hits"] - hits == len(row) * len(model.layer_cache.layers)
        torch.testing.assert_close(out, plain(input_ids=extended).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["waiting for a slot", "not fitting a slot"])
def test_a_block_kept_outside_the_slots_is_a_copy_of_what_was_put(case):
    """The store lends blocks that are views of a buffer it reuses: a block the slots do not take (every slot held,
    or a shape they do not hold) is copied, so reusing the buffer cannot change it."""
    from hf_layercache.strategies.prefix.block import BlockShape
    from hf_layercache.strategies.prefix.slots import SlotStorage

    shape = BlockShape(n_layers=2, kv_heads=2, head_dim=4, hidden_size=8, block_size=BLOCK)
    storage = SlotStorage(shape, None, None, 1, None)

    def block(seed, layers=2):
        g = torch.Generator().manual_seed(seed)
        return {
            "key": torch.randn((layers, 2, BLOCK, 4), generator=g),
            "value": torch.randn((layers, 2, BLOCK, 4), generator=g),
            "hidden": torch.randn((BLOCK, 8), generator=g),
            "tokens": torch.arange(BLOCK),
            "parent": torch.zeros(32, dtype=torch.uint8),
        }

    storage.place(storage.prepare(block(0)))  # takes the only slot
    lent = block(1) if case == "waiting for a slot" else block(1, layers=3)
    kept = {name: t.clone() for name, t in lent.items()}
    values, _, _ = storage.place(storage.prepare(lent))
    for t in lent.values():
        t.fill_(0)  # the lender reuses its memory
    for name in ("key", "value", "hidden"):
        assert values[name].untyped_storage().data_ptr() not in storage._slab_storages
        assert torch.equal(values[name], kept[name])


@pytest.mark.parametrize("shape", [(3, 70000), (2, 3, 300, 64), (5, 40, 64), (100,), (40000,)])
def test_copies_on_one_thread_land_exactly_whatever_the_slices_size(shape):
    """Pieces of at most 32,768 elements, also where one slice along the first dimension is larger than that (one
    head of a long prompt's keys), and from a strided source (a window of a cache's columns)."""
    from hf_layercache.strategies.prefix.slots import copy_on_one_thread

    source = torch.randn(*shape[:-1], shape[-1] * 2)[..., ::2]  # not contiguous
    target = torch.empty(shape)
    copy_on_one_thread(target, source)
    assert torch.equal(target, source)
