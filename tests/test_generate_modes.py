"""``generate()`` in every decoding mode with the cache on: greedy, seeded sampling, beam search, beam sampling,
several return sequences, left-padded batches of different lengths, and repeated calls (where the cache hits).

Every cached call is compared token for token with the same model uncached (a deep copy made before the cache is
enabled; transformers' eager attention for the ``attention`` strategy, which promises eager-exact maps). Each test
warms the cache with one call, then compares the *second* call of the same batch (which must hit), a call with
another seed (which must not replay the first seed's tokens), and a batch that shares only some rows with the
first (one row the cache has never seen).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from tiny import CONFIGS, DECODERS, VOCAB, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig

NEW_TOKENS = 6
BLOCK = 4  # prefix block size: the prompts below span several blocks

MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True),
    "beam": dict(num_beams=3, do_sample=False),
    "beam_sample": dict(num_beams=3, do_sample=True),
    "sample_n3": dict(do_sample=True, num_return_sequences=3),
    "beam_n2": dict(num_beams=3, num_return_sequences=2, do_sample=False),
}
SAMPLING = {name for name, kwargs in MODES.items() if kwargs.get("do_sample")}

STRATEGIES = {
    "exact": dict(strategy="exact"),
    "prefix": dict(strategy="prefix", block_size=BLOCK),
    # approximate ones, configured so that an identical prompt hits and a prompt never seen does not
    "semantic_state": dict(strategy="semantic", reuse="state", threshold=0.95, verify_fraction=0.0),
    "semantic_residual": dict(strategy="semantic", reuse="residual", threshold=0.95, verify_fraction=0.0),
    "attention": dict(strategy="attention", threshold=0.95, attention_gate_interval=0),  # the gate: tested apart
}
ARCHS = [*DECODERS, "t5"]


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def left_padded(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` left padded with ``pad_token_id=0`` (no tokenizer)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


# Prompts: three of different lengths (9, 6 and 5 tokens: several prefix blocks, padding in two rows); the
# overlapping batch reorders two of them around one the cache has never seen, of the longest one's length (so that
# lengths never decide a miss for the approximate strategies), in the same width.
PROMPTS = [tokens(9, seed=11), tokens(6, seed=12), tokens(5, seed=13)]
UNSEEN = tokens(9, seed=14)
BATCHES = {
    "single": left_padded([PROMPTS[0]]),
    "batched": left_padded(PROMPTS),
}
OVERLAPPING = {
    "single": left_padded([UNSEEN]),  # a single-prompt request the cache has never seen
    "batched": left_padded([PROMPTS[2], UNSEEN, PROMPTS[0]]),
}


def head_for(arch: str) -> type:
    return tf.AutoModelForSeq2SeqLM if arch == "t5" else tf.AutoModelForCausalLM


def generate(model, batch: dict, mode: str, seed: int) -> torch.Tensor:
    if mode in SAMPLING:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(
            **batch,
            **MODES[mode],
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )


_REFERENCES: dict[tuple, torch.Tensor] = {}


def uncached(plain, arch: str, layout: str, which: str, mode: str, seed: int) -> torch.Tensor:
    """``generate`` on the uncached copy, memoised: every tiny model of an architecture has the same weights."""
    key = (arch, plain.config._attn_implementation, layout, which, mode, seed if mode in SAMPLING else None)
    if key not in _REFERENCES:
        batch = (BATCHES if which == "batch" else OVERLAPPING)[layout]
        _REFERENCES[key] = generate(plain, batch, mode, seed)
    return _REFERENCES[key]


def totals(model) -> dict:
    return model.layer_cache.stats()["total"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def models():
    """``make(arch, strategy)`` -> (uncached copy, cached model), or a skip naming why the strategy can't serve it.

    Tiny models of one architecture share their config object, and the attention strategy selects its attention
    implementation on it: every cached model is disabled when the test ends."""
    enabled = []

    def make(arch: str, strategy: str):
        model = tiny_model(arch, head_for(arch))
        plain = copy.deepcopy(model)  # before enabling: the reference never sees a wrapper
        if strategy == "attention":
            plain.set_attn_implementation("eager")
        try:
            hf_layercache.enable(model, LayerCacheConfig(**STRATEGIES[strategy]))
        except ValueError as err:
            pytest.skip(f"strategy {strategy!r} refuses {arch}: {err}")
        enabled.append(model)
        if arch == "t5" and strategy == "attention":  # it enables, but refuses T5's relative position bias on use
            with pytest.raises(ValueError, match="position_bias") as err, torch.no_grad():
                model(input_ids=PROMPTS[0][None], decoder_input_ids=PROMPTS[0][None, :1])
            pytest.skip(f"strategy 'attention' refuses t5: {err.value}")
        return plain, model

    yield make
    for model in enabled:
        hf_layercache.disable(model)


# every mode on the left-padded batch; a single unpadded prompt with seeded sampling
CASES = [
    pytest.param(layout, strategy, arch, mode, id=f"{layout}-{strategy}-{arch}-{mode}")
    for layout, modes in (("batched", list(MODES)), ("single", ["sample"]))
    for strategy in STRATEGIES
    for arch in ARCHS
    for mode in modes
]


@pytest.mark.parametrize(("layout", "strategy", "arch", "mode"), CASES)
def test_generate_equals_uncached(layout, strategy, arch, mode, models):
    plain, model = models(arch, strategy)
    batch, overlapping = BATCHES[layout], OVERLAPPING[layout]

    # warm-up: the cache is empty, so every strategy computes, and fills it
    reference = uncached(plain, arch, layout, "batch", mode, seed=0)
    first = generate(model, batch, mode, seed=0)
    assert torch.equal(first, reference), f"warm-up call (empty cache) differs from uncached:\n{first}\n!=\n{reference}"

    # the second call of the same batch: identical for every strategy, and served from the cache
    hits = totals(model)["hits"]
    second = generate(model, batch, mode, seed=0)
    assert totals(model)["hits"] > hits, "the repeated request did not hit: the comparison would prove nothing"
    assert torch.equal(second, reference), f"repeated call differs from uncached:\n{second}\n!=\n{reference}"

    if mode in SAMPLING:  # another seed after a hit: its own tokens, never a replay of seed 0's
        other = uncached(plain, arch, layout, "batch", mode, seed=1)
        assert not torch.equal(other, reference)  # the seeds do give different tokens on this model
        hits = totals(model)["hits"]
        got = generate(model, batch, mode, seed=1)
        assert totals(model)["hits"] > hits
        assert not torch.equal(got, reference), "seed 1 after seed 0 replayed seed 0's tokens"
        assert torch.equal(got, other), f"seed 1 after a seed-0 hit differs from uncached seed 1:\n{got}\n!=\n{other}"

    # a batch sharing only some rows with the cached one (or a prompt never seen): computed where it must be
    expected = uncached(plain, arch, layout, "overlap", mode, seed=2)
    got = generate(model, overlapping, mode, seed=2)
    assert torch.equal(got, expected), f"partly-overlapping batch differs from uncached:\n{got}\n!=\n{expected}"


def test_prompts_cover_padding_and_blocks():
    """The batches the tests rely on: rows of different lengths, left padded, several prefix blocks long."""
    batch = BATCHES["batched"]
    assert batch["attention_mask"].sum(-1).tolist() == [9, 6, 5]
    assert bool((batch["input_ids"][batch["attention_mask"] == 0] == 0).all())
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()  # left padding
    assert OVERLAPPING["batched"]["input_ids"].shape == batch["input_ids"].shape
    assert all(CONFIGS[arch].vocab_size == VOCAB for arch in ARCHS)


# --- a BERT decoder on the model tester's inputs: masks with holes, token types (#30) ----------------------------
# transformers' model tester builds BERT's inputs with ``random_attention_mask`` (holes anywhere, first column kept)
# and random ``token_type_ids``, and its generation tests run them through ``BertLMHeadModel(is_decoder=True)``. A
# batch mixing a holed row (keyed with its layout: its K/V are stored whole) with a right-padded row (keyed on its
# real tokens: its K/V are stored for those only) once crashed the repeat of a generate() in kv.place_writes.
TYPE_VOCAB = 16


def random_attention_mask(rows: int, columns: int, seed: int) -> torch.Tensor:
    """transformers' ``random_attention_mask``: holes anywhere, the first column kept so no row is empty."""
    mask = torch.randint(0, 2, (rows, columns), generator=torch.Generator().manual_seed(seed))
    mask[:, 0] = 1
    return mask


HOLEY = {
    # one row of each kind the exact strategy keys differently, on purpose
    "deliberate": torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1, 1],  # no padding
            [1, 1, 1, 1, 1, 0, 0, 0],  # right-padded: keyed on its real tokens, which end before the last column
            [1, 0, 1, 1, 0, 1, 0, 1],  # holes: keyed with its layout
            [0, 0, 0, 1, 1, 1, 1, 1],  # left-padded
            [1, 1, 0, 0, 0, 0, 0, 0],  # right-padded, holding two tokens
        ]
    ),
    "random": random_attention_mask(13, 7, seed=3),  # as the model tester draws them
}


def holey_batch(layout: str) -> dict[str, torch.Tensor]:
    """``input_ids``, the mask of ``HOLEY[layout]`` and random ``token_type_ids`` (ids under the pads are random
    too, as the model tester's are)."""
    mask = HOLEY[layout]
    real = [row.nonzero().flatten() for row in mask]
    contiguous = [int(r[-1] - r[0]) + 1 == len(r) for r in real]
    assert not all(contiguous), "the batch needs a row with holes"
    assert any(c and row[-1] == 0 for c, row in zip(contiguous, mask, strict=True)), "and a right-padded row"
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(3, VOCAB, mask.shape, generator=g)
    token_types = torch.randint(0, TYPE_VOCAB, mask.shape, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}


def bert_decoder() -> tf.BertLMHeadModel:
    torch.manual_seed(0)
    config = tf.BertConfig(**{**CONFIGS["bert"].to_dict(), "is_decoder": True, "type_vocab_size": TYPE_VOCAB})
    return tf.BertLMHeadModel(config).eval()


def generate_with_logits(model, batch: dict, mode: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens and every step's logits (bit for bit: the exact strategy promises both)."""
    if mode in SAMPLING:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **batch,
            **MODES[mode],
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("layout", list(HOLEY))
@pytest.mark.parametrize("mode", list(MODES))
def test_bert_decoder_with_holes_and_token_types_generates_twice_as_uncached(layout, mode):
    """The same holey batch generated twice by a cached ``BertLMHeadModel(is_decoder=True)``: the first call fills the
    cache, the second is served from it (K/V replayed row by row, each in its own layout); both give the uncached
    twin's tokens and logits bit for bit, and so does another seed after a hit."""
    model = bert_decoder()
    plain = copy.deepcopy(model)  # the same weights, never enabled
    batch = holey_batch(layout)
    hf_layercache.enable(model, LayerCacheConfig(strategy="exact"))
    try:
        seeds = (0, 1) if mode in SAMPLING else (0,)
        for seed in seeds:
            reference = generate_with_logits(plain, batch, mode, seed)
            for call in ("first", "second"):
                hits = totals(model)["hits"]
                tokens, logits = generate_with_logits(model, batch, mode, seed)
                if call == "second" or seed > 0:
                    assert totals(model)["hits"] > hits, "the repeated batch did not hit: the check would prove nothing"
                assert torch.equal(tokens, reference[0]), f"{call} call (seed {seed}) differs in tokens"
                assert torch.equal(logits, reference[1]), f"{call} call (seed {seed}) differs in logits"
    finally:
        hf_layercache.disable(model)
