"""``torch.compile`` of a cached model: the cache's Python runs eagerly, the model's own computation compiles.

Compiled graphs are recorded by a backend that wraps ``eager`` (or ``inductor``): no operation in them may come
from ``hf_layercache`` code (dynamo once traced the lookups, with recompiles, tens of seconds of compiling and
AOTAutograd failures).
"""

import pytest
import torch
import transformers as tf
from tiny import VOCAB, tiny_batch, tiny_decoder, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code of one test (guards on its models) never serves another; requests serve without autograd."""
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()


class Recording:
    """A ``torch.compile`` backend that keeps each graph and compiles it with ``inner``."""

    def __init__(self, inner: str = "eager"):
        self.inner = torch._dynamo.lookup_backend(inner)
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)

    def cache_operations(self) -> list[str]:
        """Graph operations whose innermost frame is in ``hf_layercache``: traced cache code."""
        found = []
        for gm in self.graphs:
            for node in gm.graph.nodes:
                frames = [line for line in node.meta.get("stack_trace", "").splitlines() if "File " in line]
                if node.op == "call_function" and frames and "/hf_layercache/" in frames[-1]:
                    found.append(f"{node.target} at {frames[-1].strip()}")
        return found


def totals(model):
    return model.layer_cache.stats()["total"]


def test_exact_compiled_is_identical_and_hits_without_tracing_the_cache():
    model, batch = tiny_model("bert"), tiny_batch("bert")
    reference = model(**batch).last_hidden_state
    hf_layercache.enable(model, LayerCacheConfig(strategy="exact"))
    backend = Recording()
    compiled = torch.compile(model, backend=backend)
    first = compiled(**batch).last_hidden_state
    second = compiled(**batch).last_hidden_state
    rows, layers = batch["input_ids"].shape[0], len(model.layer_cache.layers)
    assert totals(model)["hits"] == rows * layers
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert backend.graphs and backend.cache_operations() == []


def test_exact_compiled_generate_gives_the_uncached_tokens():
    plain, model = tiny_decoder("llama"), tiny_decoder("llama")
    hf_layercache.enable(model, LayerCacheConfig(strategy="exact"))
    backend = Recording()
    model.forward = torch.compile(model.forward, backend=backend)  # how generate() runs a compiled forward
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    reference = plain.generate(ids, **settings)
    for _ in range(2):
        assert torch.equal(model.generate(ids, **settings), reference)
    assert totals(model)["hits"] > 0  # the repeated prompt was served
    assert backend.graphs and backend.cache_operations() == []


def test_prefix_compiled_logits_and_generate_match_uncached():
    plain = tiny_decoder("llama")
    model = hf_layercache.enable(tiny_decoder("llama"), LayerCacheConfig(strategy="prefix", block_size=4))
    backend = Recording()
    compiled = torch.compile(model, backend=backend)
    preamble = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(4))
    prompt = torch.cat([preamble, torch.tensor([[5, 6, 7]])], 1)
    compiled(input_ids=preamble)  # caches the preamble's blocks
    hits = totals(model)["hits"]
    torch.testing.assert_close(compiled(input_ids=prompt).logits, plain(input_ids=prompt).logits, rtol=0, atol=1e-4)
    assert totals(model)["hits"] > hits
    model.forward = torch.compile(model.forward, backend=backend)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **settings), plain.generate(prompt, **settings))
    assert backend.graphs and backend.cache_operations() == []


def test_semantic_compiled_serves_as_uncompiled():
    batch = tiny_batch("bert")
    outputs = []
    for compile_it in (False, True):
        model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="semantic"))
        backend = Recording()
        run = torch.compile(model, backend=backend) if compile_it else model
        outputs.append([run(**batch).last_hidden_state for _ in range(2)])
        assert totals(model)["hits"] > 0
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))
    assert backend.cache_operations() == []


def test_attention_compiled_is_refused_with_a_clear_error():
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig(strategy="attention"))
    try:
        with pytest.raises(RuntimeError, match=r"strategy='attention'.*torch\.compile"):
            torch.compile(model, backend="eager")(**tiny_batch("bert"))
        uncompiled = model(**tiny_batch("bert")).last_hidden_state  # the refusal left the model serving
        torch.testing.assert_close(uncompiled, tiny_model("bert")(**tiny_batch("bert"))[0], rtol=0, atol=1e-5)
    finally:  # dynamo keeps the model alive: disable it, or its global attention registration outlives the test
        hf_layercache.disable(model)


def test_exact_under_inductor_matches_uncached_and_hits():
    """The default backend, once (a few seconds on a CPU): within 1e-5 of the uncached model, hits bit-identical."""
    model, batch = tiny_model("distilbert", tf.AutoModel), tiny_batch("distilbert")
    reference = model(**batch).last_hidden_state
    hf_layercache.enable(model, LayerCacheConfig(strategy="exact"))
    backend = Recording("inductor")
    compiled = torch.compile(model, backend=backend)
    first = compiled(**batch).last_hidden_state
    second = compiled(**batch).last_hidden_state
    torch.testing.assert_close(first, reference, rtol=0, atol=1e-5)
    assert torch.equal(second, first)
    assert totals(model)["hits"] == batch["input_ids"].shape[0] * len(model.layer_cache.layers)
    assert backend.graphs and backend.cache_operations() == []
