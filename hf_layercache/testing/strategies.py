"""Conformance checks for strategies: what every registered strategy must do, runnable on your own.

Each check is a plain function ``check_*(strategy_name, **config_fields)``. It builds tiny randomly initialised
models from configs (a BERT encoder and a Llama causal decoder, 3 layers of width 32: nothing is downloaded),
enables the cache on them with ``hf_layercache.enable(model, LayerCacheConfig(strategy=strategy_name,
**config_fields))`` and drives them through the public API only (``stats``, ``clear``, ``bypass``, ``namespace``,
``save_pretrained`` / ``from_pretrained``, ``copy.deepcopy``, ``generate``, ``disable``). A model the strategy
refuses when enabled (a ``ValueError``, as ``prefix`` refuses the encoder) is left out, but at least one of the two
must be accepted. A check raises ``AssertionError`` saying what was expected, raises ``unittest.SkipTest`` (pytest
reports a skip) when it cannot apply (``peft`` not installed; no causal decoder for ``generate``), and returns
``None`` or a small dict of figures, such as an approximate strategy's fidelity, which is reported, never judged.
:func:`check_strategy` runs them all and collects the figures. From a pytest file::

    import pytest
    import hf_layercache
    from hf_layercache.testing.strategies import CHECKS

    hf_layercache.register_strategy("mine", MyStrategy)

    @pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
    def test_my_strategy(check):
        check("mine", threshold=0.9)  # keyword arguments are LayerCacheConfig fields

What "correct" means depends on the strategy's class (``hf_layercache.get_strategy(name)``): ``lossless = True``
promises outputs equal to uncached within ``tolerance`` (default 1e-4) whatever was served (a class without the
attribute counts as lossless when registered as ``exact`` or ``prefix``); an approximate strategy (``lossless =
False``, as ``semantic`` and ``attention``) must give finite outputs of the right shape, and outputs within
a loose 1e-3 of uncached where it is sent the very inputs it stored (a repeated batch after a weight or adapter
change). Pass config fields that let the strategy store from the first request (e.g. ``attention_gate_interval=0``
for ``attention``, whose gate otherwise decides from timings): the checks expect a repeated request to hit, and they
never measure time. Every check seeds torch and is deterministic.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import threading
import unittest
from collections.abc import Callable
from typing import Any

import torch
import transformers

import hf_layercache

VOCAB = 99
LENGTH = 12
KINDS = ("encoder", "decoder")
LOOSE = 1e-3
"""How close an approximate strategy must stay to uncached on inputs identical to the ones it stored."""

_WEIGHT = {"encoder": "encoder.layer.2.output.LayerNorm.weight", "decoder": "model.layers.2.mlp.down_proj.weight"}
"""A weight of the last layer: changing it changes the output but no key a strategy derives from the input. For BERT
it is the last LayerNorm's: every linear layer there reads a LayerNorm's output, whose features sum to zero, so a
constant added to a linear weight would change nothing."""

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


# --- the checks -----------------------------------------------------------------------------------------------------
def check_outputs_match_uncached(strategy_name: str, **config_fields: Any) -> dict[str, float]:
    """A batch with right padding (one row) and a hole in its mask (another row) sent twice, then a near-duplicate
    of it (one token changed in every row, after the first eight): a lossless strategy returns what a never-cached
    twin computes, within its tolerance at real tokens, every time; an approximate one returns finite outputs of the
    right shape. Returns, per model, the fidelity of the repeat and of the near-duplicate (min and mean cosine to
    uncached at real tokens) and the hits of the repeat, never judged."""
    lossless, tolerance = _contract(strategy_name)
    batch = _batch(seed=1, rows=3)
    similar = {name: tensor.clone() for name, tensor in batch.items()}
    similar["input_ids"][:, 8] = similar["input_ids"][:, 8] % (VOCAB - 4) + 4  # another real token, never a pad
    figures: dict[str, float] = {}
    with _Models(strategy_name, config_fields) as models:
        for kind, model in models.cached():
            twin = _build(kind)
            for attempt, sent in (("first", batch), ("repeated", batch), ("near-duplicate", similar)):
                hits, expected = _totals(model)["hits"], _run(twin, sent)
                out = _run(model, sent)
                what = f"{kind}, {attempt} request of a padded batch"
                _assert_finite_and_shaped(out, expected, sent["attention_mask"], what)
                if lossless:
                    _assert_close(out, expected, sent["attention_mask"], tolerance, what)
                if attempt != "first":
                    cosines = _cosines(out, expected, sent["attention_mask"])
                    figures[f"{kind}_{attempt}_min_cosine"] = cosines.min().item()
                    figures[f"{kind}_{attempt}_mean_cosine"] = cosines.mean().item()
                if attempt == "repeated":
                    figures[f"{kind}_repeat_hits"] = float(_totals(model)["hits"] - hits)
    return figures


def check_callers_writes_never_reach_the_cache(strategy_name: str, **config_fields: Any) -> None:
    """The caller owns every output it is given: writing one in place (normalising an embedding, masking logits)
    changes nothing served later. A batch of one row (whose row is the whole output tensor, so a stored row could
    share its memory) and a padded batch of three are each sent three times under ``torch.no_grad()`` (not inference
    mode, whose tensors are always copied), the caller doubling each output in place as it arrives; every output
    must equal the model uncached (lossless: within tolerance; approximate: within 1e-3, the inputs being
    identical)."""
    lossless, tolerance = _contract(strategy_name)
    with _Models(strategy_name, config_fields) as models:
        for kind, model in models.cached():
            for batch in (_batch(seed=14, rows=1), _batch(seed=15, rows=3)):
                expected = _uncached(model, batch)
                for attempt in ("first", "second", "third"):
                    out = _run(model, batch)
                    what = f"{kind}, {attempt} request of {len(out)} row(s), the caller doubling each output in place"
                    _assert_close(out, expected, batch["attention_mask"], _loose(lossless, tolerance), what)
                    out.mul_(2)


def check_namespaces_never_share(strategy_name: str, **config_fields: Any) -> None:
    """Entries stored in namespace "a" (the config's ``namespace``) are never served to "b" (``with
    model.layer_cache.namespace("b"):``): b's first request of a's batch gets no hit (and, lossless, the uncached
    output) and stores as many entries of its own as a did; then each namespace's repeat (b's, then a's) is served
    its own entries."""
    lossless, tolerance = _contract(strategy_name)
    batch = _batch(seed=2)
    with _Models(strategy_name, {**config_fields, "namespace": "a"}) as models:
        for kind, model in models.cached():
            _run(model, batch)
            stored = _namespace_entries(model, "a")
            hits = _totals(model)["hits"]
            with model.layer_cache.namespace("b"):
                out = _run(model, batch)
            served = _totals(model)["hits"] - hits
            assert served == 0, f"{kind}: namespace 'b' was served {served} hits from entries namespace 'a' stored"
            if lossless:
                _assert_close(out, _uncached(model, batch), batch["attention_mask"], tolerance, f"{kind}, namespace b")
            own = _namespace_entries(model, "b")
            assert own == stored > 0, f"{kind}: namespace 'a' stored {stored} entries for a batch, 'b' {own} for it"
            repeats = {}
            for name in ("b", "a"):
                hits = _totals(model)["hits"]
                with model.layer_cache.namespace(name):
                    _run(model, batch)
                repeats[name] = _totals(model)["hits"] - hits
            assert min(repeats.values()) > 0, f"{kind}: a namespace's repeat was not served its own entries: {repeats}"


def check_weight_change_never_serves_stale(strategy_name: str, **config_fields: Any) -> None:
    """After a weight of the last layer changes in place (under ``torch.no_grad()``) and then through ``.data``, the
    next request and its repeat equal the model uncached with the new weights (lossless: within tolerance;
    approximate: within 1e-3, the inputs being identical, and the change counted in ``invalidations``)."""
    lossless, tolerance = _contract(strategy_name)
    batch = _batch(seed=3)
    routes: dict[str, Callable[[torch.nn.Parameter], Any]] = {
        "p.add_(0.5) under torch.no_grad()": _add_in_place,
        "p.data.mul_(2)": lambda p: p.data.mul_(2),
    }
    with _Models(strategy_name, config_fields) as models:
        for kind, model in models.cached():
            weight = model.get_parameter(_WEIGHT[kind])
            _run(model, batch)
            _run(model, batch)
            for route, change in routes.items():
                invalidations, before = _totals(model)["invalidations"], _uncached(model, batch)
                change(weight)
                moved = _max_error(before, _uncached(model, batch), batch["attention_mask"])
                assert moved > 0.01, f"{kind}: {route} moved the uncached output by only {moved:.3g}: nothing to see"
                for attempt in ("first", "repeated"):
                    out = _run(model, batch)
                    what = f"{kind}, {attempt} request after {route}"
                    _assert_close(
                        out, _uncached(model, batch), batch["attention_mask"], _loose(lossless, tolerance), what
                    )
                if not lossless:
                    grew = _totals(model)["invalidations"] > invalidations
                    assert grew, f"{kind}: {route} was not counted in stats()['total']['invalidations']"


def check_adapter_switch_never_serves_stale(strategy_name: str, **config_fields: Any) -> None:
    """The cached causal decoder wrapped by PEFT with two LoRA adapters: switching tone -> mood -> tone, every request
    and its repeat equal the model uncached (``bypass()``) with the active adapter (lossless: within tolerance;
    approximate: within 1e-3, the inputs being identical), and the two adapters do compute different outputs."""
    try:
        import peft
    except ImportError:
        raise unittest.SkipTest("peft is not installed (pip install peft): adapter switches are not checked") from None
    lossless, tolerance = _contract(strategy_name)
    batch = _batch(seed=4)
    with _Models(strategy_name, config_fields) as models:
        [(_, base)] = models.cached(kinds=("decoder",))
        torch.manual_seed(4)
        lora = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        wrapped = peft.get_peft_model(base, peft.LoraConfig(**lora), adapter_name="tone")
        wrapped.add_adapter("mood", peft.LoraConfig(**lora))
        wrapped.eval()
        outputs = {}
        for name in ("tone", "mood", "tone"):
            wrapped.set_adapter(name)
            for attempt in ("first", "repeated"):
                out = _run(wrapped, batch)
                expected = _uncached(base, batch, wrapped)
                what = f"{attempt} request with adapter {name!r} active (after {list(outputs) or 'none'})"
                _assert_close(out, expected, batch["attention_mask"], _loose(lossless, tolerance), what)
            outputs[name] = out
    apart = _max_error(outputs["tone"], outputs["mood"], batch["attention_mask"])
    assert apart > 0.01, f"the two adapters' outputs differ by only {apart:.3g}: the check saw no switch"


def check_disable_restores_the_model(strategy_name: str, **config_fields: Any) -> None:
    """After ``hf_layercache.disable(model)`` on a used model, ``model.forward``, every module's ``__dict__`` keys, its
    hooks, the types of its tensors and its config are as before ``enable``, and its outputs are bit-identical to
    those of an identical model that was never cached."""
    config = _config(strategy_name, config_fields)
    batch = _batch(seed=5)
    accepted = []
    with _Models(strategy_name, config_fields) as models:
        for kind in KINDS:
            model = _build(kind)
            before = _anatomy(model)
            try:
                hf_layercache.enable(models.track(model), copy.deepcopy(config))
            except ValueError:
                continue
            accepted.append(kind)
            for _ in range(2):
                _run(model, batch)
            with model.layer_cache.namespace("other"):
                _run(model, batch)
            hf_layercache.disable(model)
            after = _anatomy(model)
            changed = sorted(part for part in before if before[part] != after[part])
            assert not changed, f"{kind}: disable() left the model changed in {changed}: {_difference(before, after)}"
            out, expected = _run(model, batch), _run(_build(kind), batch)
            assert torch.equal(out, expected), f"{kind}: after disable() outputs differ from a never-cached model"
    assert accepted, f"strategy {strategy_name!r} refused both the encoder and the decoder"


def check_save_load_round_trip_hits(strategy_name: str, **config_fields: Any) -> None:
    """``save_pretrained`` of a used model and ``from_pretrained`` of its directory give a model whose cache is back:
    the first request of the saved batch hits (lossless: and equals uncached within tolerance)."""
    lossless, tolerance = _contract(strategy_name)
    batch = _batch(seed=6)
    with _Models(strategy_name, config_fields) as models:
        for kind, model in models.cached():
            _run(model, batch)
            with tempfile.TemporaryDirectory() as directory:
                model.save_pretrained(directory)
                loaded = models.track(type(model).from_pretrained(directory))
                assert hasattr(loaded, "layer_cache"), f"{kind}: from_pretrained gave a model without its cache"
                out = _run(loaded, batch)
                hits = _totals(loaded)["hits"]
                assert hits > 0, f"{kind}: the first request after from_pretrained got no hit from the warm cache"
                if lossless:
                    _assert_close(out, _uncached(loaded, batch), batch["attention_mask"], tolerance, f"{kind}, loaded")


def check_deepcopy_is_independent(strategy_name: str, **config_fields: Any) -> None:
    """``copy.deepcopy`` of a used model has a cache of its own, warm (the original's batch hits); clearing the copy
    and filling it with another batch leaves the original's entries, which still serve the original's repeat."""
    lossless, tolerance = _contract(strategy_name)
    batch, other = _batch(seed=7), _batch(seed=8)
    with _Models(strategy_name, config_fields) as models:
        for kind, model in models.cached():
            _run(model, batch)
            clone = models.track(copy.deepcopy(model))
            entries = _totals(model)["entries"]
            assert clone.layer_cache is not model.layer_cache, f"{kind}: the copy shares the original's cache"
            out = _run(clone, batch)
            assert _totals(clone)["hits"] > 0, f"{kind}: the copy of a used model is cold (no hit on its batch)"
            if lossless:
                _assert_close(out, _run(_build(kind), batch), batch["attention_mask"], tolerance, f"{kind}, the copy")
            clone.layer_cache.clear()
            _run(clone, other)
            after = _totals(model)["entries"]
            assert after == entries, f"{kind}: the original's entries went from {entries} to {after} via its copy"
            hits = _totals(model)["hits"]
            _run(model, batch)
            assert _totals(model)["hits"] > hits, f"{kind}: the original's repeat got no hit after its copy was cleared"


def check_concurrent_requests(strategy_name: str, **config_fields: Any) -> None:
    """Four threads each send their own batch (every batch shares its first row with the others) three times at
    once: no exception, and every output equals a never-cached twin's within tolerance (lossless) or is finite and of
    the right shape (approximate)."""
    lossless, tolerance = _contract(strategy_name)
    shared = _batch(seed=9, rows=1)["input_ids"][0]
    batches = [_batch(seed=10 + i, rows=2) for i in range(4)]
    for batch in batches:
        batch["input_ids"][0] = shared
    with _Models(strategy_name, config_fields) as models:
        for kind, model in models.cached():
            twin = _build(kind)
            expected = [_run(twin, batch) for batch in batches]
            outputs, errors = _send_concurrently(model, batches, repeats=3)
            assert not errors, f"{kind}: concurrent requests raised: {errors}"
            for i, outs in outputs.items():
                mask = batches[i]["attention_mask"]
                for n, out in enumerate(outs):
                    what = f"{kind}, thread {i}, request {n + 1}"
                    _assert_finite_and_shaped(out, expected[i], mask, what)
                    if lossless:
                        _assert_close(out, expected[i], mask, tolerance, what)


GENERATE_MODES: dict[str, dict[str, Any]] = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True),
    "beam search": dict(num_beams=2, do_sample=False),
}


def check_generate_modes(strategy_name: str, **config_fields: Any) -> None:
    """``generate(max_new_tokens=4)`` on a left-padded batch of the causal decoder, greedy, sampling (torch seeded
    before each call) and beam search, each twice: lossless, token-identical to the model uncached (``bypass()``);
    approximate, it runs and returns the prompts followed by 1 to 4 new tokens."""
    lossless, _ = _contract(strategy_name)
    batch = _batch(seed=11, rows=3, padding="left")
    width = batch["input_ids"].shape[1]
    with _Models(strategy_name, config_fields) as models:
        [(_, model)] = models.cached(kinds=("decoder",))
        for mode, kwargs in GENERATE_MODES.items():
            for attempt in ("first", "repeated"):
                out = _generate(model, batch, kwargs)
                with model.layer_cache.bypass():
                    expected = _generate(model, batch, kwargs)
                what = f"generate() with {mode}, {attempt} call"
                if lossless:
                    assert torch.equal(out, expected), f"{what}: tokens {out.tolist()}, uncached {expected.tolist()}"
                    continue
                assert out.shape[0] == expected.shape[0] and width < out.shape[1] <= width + 4, (
                    f"{what}: sequences of shape {tuple(out.shape)}, expected ({expected.shape[0]}, {width}+1..4)"
                )
                assert torch.equal(out[:, :width], batch["input_ids"]), f"{what}: the prompts came back changed"


def check_bad_inputs_behave_as_uncached(strategy_name: str, **config_fields: Any) -> None:
    """An empty batch, a row whose attention mask is all zeros and ``inputs_embeds`` instead of ``input_ids``, each
    sent twice: the same exception type as the model uncached (``bypass()``), or its output (same shape, no NaN or
    infinity where uncached has none, and at real tokens within tolerance; approximate: within 1e-3, the inputs being
    identical)."""
    lossless, tolerance = _contract(strategy_name)
    with _Models(strategy_name, config_fields) as models:
        for kind, model in models.cached():
            for case, batch in _bad_inputs(model).items():
                expected = _outcome(functools.partial(_uncached, model, batch))
                for attempt in ("first", "repeated"):
                    out = _outcome(functools.partial(_raw, model, batch))
                    what = f"{kind}, {case}, {attempt} request"
                    if isinstance(expected, BaseException) or isinstance(out, BaseException):
                        assert type(out) is type(expected), (
                            f"{what}: cached gave {_describe(out)}, uncached {_describe(expected)}"
                        )
                        continue
                    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)}, uncached {expected.shape}"
                    new = torch.isfinite(expected) & ~torch.isfinite(out)
                    assert not new.any(), f"{what}: {int(new.sum())} NaN/infinite values where uncached has none"
                    _assert_close(out, expected, batch["attention_mask"], _loose(lossless, tolerance), what)


CHECKS: tuple[Callable[..., dict[str, float] | None], ...] = (
    check_outputs_match_uncached,
    check_callers_writes_never_reach_the_cache,
    check_namespaces_never_share,
    check_weight_change_never_serves_stale,
    check_adapter_switch_never_serves_stale,
    check_disable_restores_the_model,
    check_save_load_round_trip_hits,
    check_deepcopy_is_independent,
    check_concurrent_requests,
    check_generate_modes,
    check_bad_inputs_behave_as_uncached,
)


def check_strategy(strategy_name: str, **config_fields: Any) -> dict[str, Any]:
    """Run every conformance check on the registered strategy ``strategy_name``; the first failure raises
    ``AssertionError``. Returns, per check, the figures it returned (``None`` for none) or ``"skipped: <why>"``."""
    results: dict[str, Any] = {}
    for check in CHECKS:
        try:
            results[check.__name__] = check(strategy_name, **config_fields)
        except unittest.SkipTest as skip:
            results[check.__name__] = f"skipped: {skip}"
    return results


# --- models, batches and runs ---------------------------------------------------------------------------------------
def _contract(strategy_name: str) -> tuple[bool, float]:
    """(lossless, tolerance) as the strategy's class declares them; built-ins without the attributes: exact and
    prefix are lossless, within 1e-4."""
    cls = hf_layercache.get_strategy(strategy_name)
    return bool(getattr(cls, "lossless", strategy_name in ("exact", "prefix"))), float(getattr(cls, "tolerance", 1e-4))


def _loose(lossless: bool, tolerance: float) -> float:
    return tolerance if lossless else max(tolerance, LOOSE)


def _config(strategy_name: str, config_fields: dict[str, Any]) -> hf_layercache.LayerCacheConfig:
    return hf_layercache.LayerCacheConfig(strategy=strategy_name, **config_fields)


def _model_config(kind: str) -> transformers.PretrainedConfig:
    sizes = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37)
    common = dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
    if kind == "encoder":
        return transformers.BertConfig(**sizes, **common)
    return transformers.LlamaConfig(**sizes, **common, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)


def _build(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random model (the same weights for the same seed): a BERT encoder or a Llama causal LM."""
    torch.manual_seed(seed)
    cls = transformers.BertModel if kind == "encoder" else transformers.LlamaForCausalLM
    return cls(_model_config(kind)).eval()


class _Models:
    """The models one check enabled, all disabled when it ends (a strategy may hold global state until its last model
    is disabled, as ``attention`` does with its registered attention function)."""

    def __init__(self, strategy_name: str, config_fields: dict[str, Any]):
        self.strategy_name = strategy_name
        self.config = _config(strategy_name, config_fields)  # a bad field raises here, not as a refused model
        self.enabled: list[torch.nn.Module] = []

    def __enter__(self) -> _Models:
        return self

    def __exit__(self, *exc: object) -> None:
        for model in reversed(self.enabled):
            hf_layercache.disable(model)

    def track(self, model: torch.nn.Module) -> Any:
        self.enabled.append(model)
        return model

    def cached(self, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, transformers.PreTrainedModel]]:
        """The models of ``kinds`` with the cache on, less those the strategy refuses; at least one must remain."""
        models, refused = [], {}
        for kind in kinds:
            model = _build(kind)
            try:
                hf_layercache.enable(model, copy.deepcopy(self.config))
            except ValueError as err:
                refused[kind] = str(err)
                continue
            models.append((kind, self.track(model)))
        if not models and kinds != KINDS:
            raise unittest.SkipTest(f"strategy {self.strategy_name!r} refuses the {' and '.join(kinds)}: {refused}")
        assert models, f"strategy {self.strategy_name!r} refused both models: {refused}"
        return models


def _batch(seed: int, rows: int = 2, length: int = LENGTH, padding: str = "right") -> dict[str, torch.Tensor]:
    """Random ids; with ``rows >= 2`` row 1 is padded (3 pads at the end, or 2 in front); with 3 rows, row 2 has a
    hole in the middle of its mask (right) or 4 pads in front (left). Masked positions hold the pad id 0."""
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    right = padding == "right"
    if rows >= 2:
        mask[1, slice(-3, None) if right else slice(0, 2)] = 0
    if rows >= 3:
        mask[2, length // 3 if right else slice(0, 4)] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _bad_inputs(model: transformers.PreTrainedModel) -> dict[str, dict[str, torch.Tensor]]:
    batch = _batch(seed=12)
    empty = {name: tensor[:0] for name, tensor in batch.items()}
    silent = {name: tensor.clone() for name, tensor in batch.items()}
    silent["attention_mask"][1] = 0
    silent["input_ids"][1] = 0
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
    return {
        "an empty batch": empty,
        "a row whose attention mask is all zeros": silent,
        "inputs_embeds instead of input_ids": {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]},
    }


def _run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output (logits, or the last hidden state) for ``batch``, with autograd off; an exception
    becomes an ``AssertionError`` (chained to it): these requests are ones an uncached model answers."""
    try:
        return _raw(model, batch)
    except Exception as err:
        shapes = {name: tuple(tensor.shape) for name, tensor in batch.items()}
        raise AssertionError(
            f"a request {shapes} to {type(model).__name__} raised {type(err).__name__}: {err}; expected an output"
        ) from err


def _raw(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out["logits"] if "logits" in out else out["last_hidden_state"]


def _uncached(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], caller: torch.nn.Module | None = None
) -> torch.Tensor:
    """``batch`` through ``caller`` (default: ``model``) with ``model``'s cache bypassed."""
    with model.layer_cache.bypass():
        return _raw(caller if caller is not None else model, batch)


def _generate(model: torch.nn.Module, batch: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> torch.Tensor:
    torch.manual_seed(13)
    with torch.no_grad():
        return model.generate(**batch, **kwargs, max_new_tokens=4, pad_token_id=0)


def _send_concurrently(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], repeats: int
) -> tuple[dict[int, list[torch.Tensor]], list[str]]:
    """One thread per batch, started together, each sending its batch ``repeats`` times: their outputs, and what
    each thread that failed raised."""
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(batches))}
    errors: list[str] = []
    start = threading.Barrier(len(batches))

    def send(i: int) -> None:
        try:
            start.wait()
            for _ in range(repeats):
                outputs[i].append(_run(model, batches[i]))
        except BaseException as err:  # reported by the check, with the thread it came from
            errors.append(f"thread {i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outputs, errors


def _totals(model: torch.nn.Module) -> dict[str, Any]:
    return model.layer_cache.stats()["total"]


def _namespace_entries(model: torch.nn.Module, name: str) -> int:
    return model.layer_cache.stats()["namespaces"].get(name, {}).get("entries", 0)


def _add_in_place(weight: torch.nn.Parameter) -> None:
    with torch.no_grad():
        weight.add_(0.5)


def _outcome(call: Callable[[], torch.Tensor]) -> torch.Tensor | BaseException:
    try:
        return call()
    except Exception as err:  # compared by type with the uncached outcome
        return err


def _describe(outcome: torch.Tensor | BaseException) -> str:
    if isinstance(outcome, BaseException):
        return f"{type(outcome).__name__}: {outcome}"
    return f"an output of shape {tuple(outcome.shape)}"


# --- comparisons ----------------------------------------------------------------------------------------------------
def _real(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The positions of real tokens (mask 1), one row each: what pads hold is the model's business, not the cache's."""
    return out[mask.bool()].float()


def _max_error(out: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    if out.shape != expected.shape:
        return float("inf")
    difference = (_real(out, mask) - _real(expected, mask)).abs()
    return difference.nan_to_num(float("inf")).max().item() if difference.numel() else 0.0


def _assert_close(out: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, tolerance: float, what: str) -> None:
    error = _max_error(out, expected, mask)
    if not error <= tolerance:
        raise AssertionError(
            f"{what}: differs from uncached by up to {error:.3g} at real tokens, expected at most {tolerance:g}"
            + ("" if out.shape == expected.shape else f" (shape {tuple(out.shape)}, uncached {tuple(expected.shape)})")
        )


def _assert_finite_and_shaped(out: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    assert out.shape == expected.shape, f"{what}: output of shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    finite = torch.isfinite(_real(out, mask))
    assert finite.all(), f"{what}: {int((~finite).sum())} NaN or infinite values at real tokens"


def _cosines(out: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per real token, the cosine similarity of the output to uncached."""
    return torch.nn.functional.cosine_similarity(_real(out, mask), _real(expected, mask), dim=-1)


def _anatomy(model: torch.nn.Module) -> dict[str, Any]:
    """What ``disable()`` must put back: the forward, each module's attribute names and hooks, tensor types, config."""
    return {
        "forward": model.forward,
        "module attributes": {name: sorted(module.__dict__) for name, module in model.named_modules()},
        "hooks": {
            name: [len(getattr(module, hooks, ())) for hooks in _HOOK_DICTS] for name, module in model.named_modules()
        },
        "tensor types": {
            name: type(tensor).__qualname__ for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        },
        "config": model.config.to_dict(),
    }


def _difference(before: dict[str, Any], after: dict[str, Any]) -> str:
    parts = []
    for part, value in before.items():
        if isinstance(value, dict) and isinstance(after[part], dict):
            keys = sorted(set(value) | set(after[part]))
            changed = [key for key in keys if value.get(key) != after[part].get(key)]
            parts.append(
                f"{part}: " + ", ".join(f"{k}: {value.get(k)!r} -> {after[part].get(k)!r}" for k in changed[:3])
            )
        elif value != after[part]:
            parts.append(f"{part}: {value!r} -> {after[part]!r}")
    return "; ".join(parts)
