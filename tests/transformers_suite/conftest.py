"""The referee: transformers' own ``ModelTesterMixin`` run against this project's tiny testers, with a cache on.

Collected only when ``HF_LAYERCACHE_REFEREE=1`` (``run_referee.py`` sets it): the project's normal ``pytest`` run
skips this folder, and importing this file then does nothing else.

``HF_LAYERCACHE_REFEREE_STRATEGY`` (``none`` | ``exact`` | ``prefix``, default ``none``) switches a layer cache on
for every outermost model the tests build, through three patches of ``PreTrainedModel`` that are in place only while
one of this folder's tests runs:

* ``PreTrainedModel.__call__``: the first call of a model that is not running inside another model's call and
  carries no layer-cache hook anywhere (a ``forward`` that is an ``hf_layercache.hooks.HookedForward``) does
  ``hf_layercache.enable(model, LayerCacheConfig(strategy=...))`` -- covers ``model_class(config)``,
  ``from_config``, ``deepcopy``-free constructions;
* ``PreTrainedModel.from_pretrained``: called with ``layer_cache=LayerCacheConfig(...)`` as a user would, unless the
  caller passed ``layer_cache`` itself or the directory holds a saved layer cache (``layer_cache_config.json``):
  then the library restores it by itself (README: ``warm = AutoModel.from_pretrained("warm")``);
* ``PreTrainedModel.save_pretrained``: a model saved before its first call is enabled first, so what the tests save
  is a warm directory and what they load from it goes through the restore path.

A ``ValueError`` raised *inside* ``hf_layercache.enable`` is the strategy refusing the model (``prefix`` refuses
encoders, heads that read ``input_ids``, sliding windows): the model then runs uncached, and the refusal is recorded.
Any other error propagates and fails the test.

``HF_LAYERCACHE_REFEREE_REPORT`` (a path): one JSON line per test with the models enabled (``warm``: by the
library, from a saved cache), refused and already cached, and the summed cache counters (lookups, hits) of the
models it enabled, so a harness that never turns the cache on, or a cache that never serves anything, shows in the
runner's table.
``HF_LAYERCACHE_REFEREE_CONFIG``: JSON merged into the ``LayerCacheConfig`` (default for ``prefix``:
``{"block_size": 2}``, so the testers' 7-token inputs hold complete blocks).
"""

from __future__ import annotations

import json
import os
import random
import threading
import weakref

import pytest

ENABLED = os.environ.get("HF_LAYERCACHE_REFEREE") == "1"

if not ENABLED:
    collect_ignore_glob = ["*.py"]
else:
    import numpy as np
    import referee_upstream as upstream  # this folder is on sys.path (rootdir-less conftest, prepend import mode)
    import torch

    upstream.prepare()

    from transformers import PreTrainedModel

    import hf_layercache
    from hf_layercache import hooks as _hooks
    from hf_layercache.config import CONFIG_NAME
    from hf_layercache.integration import enable as _enable_function

    STRATEGY = os.environ.get("HF_LAYERCACHE_REFEREE_STRATEGY", "none")
    if STRATEGY not in ("none", "exact", "prefix", "attention"):
        raise pytest.UsageError(f"HF_LAYERCACHE_REFEREE_STRATEGY={STRATEGY!r}: use none, exact, prefix or attention")
    # attention: lossless (only bit-identical positions reused) and every prefill call cached, so the referee
    # checks the mechanism itself, not the gate's choice of sdpa
    DEFAULT_OVERRIDES = {
        "prefix": {"block_size": 2},
        "attention": {"attention_position_tolerance": 0.0, "attention_gate_interval": 0},
    }
    OVERRIDES = {
        **DEFAULT_OVERRIDES.get(STRATEGY, {}),
        **json.loads(os.environ.get("HF_LAYERCACHE_REFEREE_CONFIG") or "{}"),
    }
    REPORT = os.environ.get("HF_LAYERCACHE_REFEREE_REPORT")

    def make_config():
        return hf_layercache.LayerCacheConfig(strategy=STRATEGY, **OVERRIDES)

    class _Record:
        def __init__(self):
            self.enabled: list[str] = []
            self.refused: list[list[str]] = []
            self.preexisting = 0
            self.warm = 0
            self.seen = 0
            self.controllers: list = []

        def as_dict(self, nodeid: str) -> dict:
            totals = {"lookups": 0, "hits": 0, "bypassed": 0}
            for controller in self.controllers:
                try:
                    total = controller.stats()["total"]
                except Exception:  # a broken controller is the test's business, not the report's
                    continue
                for key in totals:
                    totals[key] += int(total.get(key, 0))
            return {
                "nodeid": nodeid,
                "strategy": STRATEGY,
                "enabled": self.enabled,
                "refused": self.refused,
                "preexisting": self.preexisting,
                "warm": self.warm,
                "seen": self.seen,
                **totals,
            }

    _record = _Record()
    _local = threading.local()
    _decided: weakref.WeakSet = weakref.WeakSet()

    def _hooked(module) -> bool:
        """Does this module carry a layer-cache hook (``model.layer_cache``, or a forward the library replaced)?"""
        return "layer_cache" in module.__dict__ or isinstance(module.__dict__.get("forward"), _hooks.HookedForward)

    def _has_cache(model) -> bool:
        return any(_hooked(m) for m in model.modules())

    def _is_refusal(err: BaseException) -> bool:
        """A ValueError raised inside ``hf_layercache.enable`` (not a warm-cache file error)."""
        if not isinstance(err, ValueError) or isinstance(err, hf_layercache.LayerCacheFileError):
            return False
        tb = err.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code is _enable_function.__code__:
                return True
            tb = tb.tb_next
        return False

    def _note_enabled(model, warm: bool = False) -> None:
        _record.enabled.append(type(model).__name__)
        _record.warm += warm
        controller = model.__dict__.get("layer_cache")
        if controller is not None:
            _record.controllers.append(controller)

    def _decide(model) -> None:
        _decided.add(model)
        _record.seen += 1
        if _has_cache(model):
            _record.preexisting += 1
            return
        if STRATEGY == "none":
            return
        try:
            hf_layercache.enable(model, make_config())
        except ValueError as err:
            if not _is_refusal(err):
                raise
            _record.refused.append([type(model).__name__, str(err).splitlines()[0][:300]])
            return
        _note_enabled(model)

    _original_call = PreTrainedModel.__call__

    def _referee_call(self, *args, **kwargs):
        depth = getattr(_local, "depth", 0)
        if depth == 0 and self not in _decided:
            _decide(self)
        _local.depth = depth + 1
        try:
            return _original_call(self, *args, **kwargs)
        finally:
            _local.depth = depth

    _original_from_pretrained = PreTrainedModel.__dict__["from_pretrained"].__func__  # hf_layercache's wrapper
    _original_save_pretrained = PreTrainedModel.__dict__["save_pretrained"]

    def _is_warm(path) -> bool:
        """A directory holding a saved layer cache: ``from_pretrained`` restores it without ``layer_cache=``."""
        return isinstance(path, str | os.PathLike) and os.path.isfile(os.path.join(path, CONFIG_NAME))

    def _loaded(result):
        model = result[0] if isinstance(result, tuple) else result  # output_loading_info=True: (model, info)
        return model if isinstance(model, PreTrainedModel) else None

    def _referee_from_pretrained(cls, *args, **kwargs):
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        inject = (
            STRATEGY != "none"
            and "layer_cache" not in kwargs
            and not getattr(_local, "depth", 0)
            and not _is_warm(path)
        )
        if not inject:  # a warm directory: the library restores the saved cache by itself, as the README shows
            result = _original_from_pretrained(cls, *args, **kwargs)
            model = _loaded(result)
            if model is not None and model not in _decided:
                _decided.add(model)
                _record.seen += 1
                if _has_cache(model):
                    _note_enabled(model, warm=True)
            return result
        try:
            result = _original_from_pretrained(cls, *args, layer_cache=make_config(), **kwargs)
        except ValueError as err:
            if not _is_refusal(err):
                raise
            result = _original_from_pretrained(cls, *args, **kwargs)  # refused: load it uncached
            _record.refused.append([cls.__name__, str(err).splitlines()[0][:300]])
            model = _loaded(result)
            if model is not None:
                _decided.add(model)
                _record.seen += 1
            return result
        model = _loaded(result)
        if model is not None:
            _decided.add(model)
            _record.seen += 1
            _note_enabled(model)
        return result

    def _referee_save_pretrained(self, *args, **kwargs):
        """A model saved before its first call gets its (empty) cache first, so saved directories are warm."""
        if not getattr(_local, "depth", 0) and self not in _decided:
            _decide(self)
        return _original_save_pretrained(self, *args, **kwargs)

    _PATCHES = {
        "__call__": _referee_call,
        "from_pretrained": classmethod(_referee_from_pretrained),
        "save_pretrained": _referee_save_pretrained,
    }
    _ABSENT = object()

    def _patch() -> dict:
        """Switch the referee on (only around this folder's tests: other tests in the same session are untouched)."""
        saved = {name: PreTrainedModel.__dict__.get(name, _ABSENT) for name in _PATCHES}
        for name, value in _PATCHES.items():
            setattr(PreTrainedModel, name, value)
        return saved

    def _unpatch(saved: dict) -> None:
        for name, value in saved.items():
            if value is _ABSENT:
                delattr(PreTrainedModel, name)
            else:
                setattr(PreTrainedModel, name, value)

    def pytest_configure(config):
        for marker in ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "accelerate_tests",
                       "torch_compile_test", "generate", "is_flaky"):  # fmt: skip
            config.addinivalue_line("markers", f"{marker}: upstream transformers marker")

    def pytest_report_header(config):
        return [
            f"hf_layercache referee: strategy={STRATEGY} overrides={OVERRIDES} "
            f"transformers upstream tests from {upstream.sdist_path(download=False).name}"
        ]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        global _record
        _record = _Record()
        saved = _patch()
        try:
            yield
        finally:
            _unpatch(saved)
        if REPORT:
            with open(REPORT, "a") as f:
                f.write(json.dumps(_record.as_dict(item.nodeid)) + "\n")
        _record = _Record()

    @pytest.fixture(autouse=True)
    def _referee_seed():
        """Same random inputs in every mode: upstream's ``ids_tensor`` draws from an unseeded global ``Random``."""
        from transformers_upstream_tests import test_modeling_common

        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        test_modeling_common.global_rng.seed(0)
        yield
