"""LayerCacheConfig validation and serialisation; the public registries."""

import dataclasses
import json
import warnings

import pytest
from tiny import tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig
from hf_layercache.cli.inspect import BUILTIN_STRATEGIES, common_fields, strategy_fields, strategy_section
from hf_layercache.config import parse_bytes
from hf_layercache.registry import STRATEGIES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "magic"}, r"strategy='magic' is not available; allowed: .*exact"),
        ({"backend": "nope"}, r"backend='nope' is not available"),
        ({"policy": "random"}, r"policy='random' is not available; allowed: .*lru"),
        ({"fingerprint": "x"}, r"fingerprint='x' is not available"),
        ({"threshold": 1.5}, r"threshold must be a cosine similarity in \[-1, 1\]"),
        ({"threshold": []}, r"threshold must be"),
        ({"threshold": True}, r"threshold must be"),
        ({"layers": [1, 1]}, r"layers=\[1, 1\] is not allowed"),
        ({"layers": [-1]}, r"layers=\[-1\] is not allowed"),
        ({"layers": ""}, r"layers='' is not allowed"),
        ({"max_entries": 0}, r"max_entries must be a positive int up to 2\*\*63 - 1, or None, got 0"),
        ({"max_entries": True}, r"max_entries must be"),
        ({"max_memory": "lots"}, r"max_memory='lots' is not a size"),
        ({"max_memory": -5}, r"max_memory must be positive"),
        ({"storage_dtype": "int8"}, r"storage_dtype='int8' is not allowed"),
        ({"namespace": ""}, r"namespace must be a non-empty string"),
        ({"bank_device": "cuda:7"}, r"bank_device='cuda:7' is not allowed"),
        ({"backend_kwargs": []}, r"backend_kwargs must be a dict"),
        ({"policy_kwargs": {"halflife": 3}}, r"policy_kwargs=\{'halflife': 3\} do not fit policy 'lru'"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerCacheConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"namespace": "x" * 10**6}, r"namespace must be at most 256 characters, got one of 1000000"),  # 1 MB
        ({"namespace": "#other"}, r"namespace='#other' is not allowed: names starting with '#' are the report's"),
        ({"namespace": "a\x1fb"}, r"namespace='a\\x1fb' contains the control character"),  # the key-space separator
        ({"namespace": "a\nb"}, r"namespace='a\\nb' contains the control character"),
        ({"namespace": "\ud800"}, r"namespace='\\ud800' contains the control character or surrogate"),
        (
            {"max_entries": 2**63},
            r"max_entries must be a positive int up to 2\*\*63 - 1, or None, got 9223372036854775808",
        ),
        ({"max_memory": 2**63}, r"max_memory must be positive and at most 2\*\*63 - 1 bytes, got 9223372036854775808"),
        ({"layers": [0, 1], "threshold": [0.9]}, r"threshold has 1 values for 2 cached layers \(layers=\[0, 1\]\)"),
        ({"layers": [0], "threshold": [0.9, 0.8]}, r"threshold has 2 values for 1 cached layers"),
    ],
    ids=[
        "namespace-1MB",
        "namespace-#",
        "namespace-separator",
        "namespace-newline",
        "namespace-surrogate",
        "max_entries-2**63",
        "max_memory-2**63",
        "threshold-short",
        "threshold-long",
    ],
)
def test_values_that_cannot_work_are_refused_when_the_config_is_built(kwargs, message):
    """#30 item 6: each of these built and failed later (on a request, in a Redis key space, in a tensor)."""
    with pytest.raises(ValueError, match=message):
        LayerCacheConfig(**kwargs)


def test_namespace_bounds_and_what_stays_allowed():
    from hf_layercache.request import MAX_NAMESPACE_LENGTH, check_namespace

    assert MAX_NAMESPACE_LENGTH == 256
    for name in ("n" * 256, "é/team:1 x", "user@example.com", "other", "a#b", "租户"):
        assert LayerCacheConfig(namespace=name).namespace == name == check_namespace(name)
    with pytest.raises(ValueError, match="at most 256 characters"):
        LayerCacheConfig(namespace="n" * 257)
    with pytest.raises(ValueError, match=r"^tenant must be a non-empty string"):
        check_namespace(None, "tenant")  # the field named is the caller's
    per_layer = {"strategy": "semantic", "threshold": [0.8, 0.9]}
    assert LayerCacheConfig(layers=[2, 0], **per_layer).threshold_for(1) == 0.9
    assert LayerCacheConfig(layers="encoder.layer", **per_layer).threshold == [0.8, 0.9]  # count unknown


def test_no_number_field_takes_nan_or_infinity():
    """check_number is what every strategy's config uses; no bound may let a non-finite value through."""
    from hf_layercache.config import check_number

    with pytest.raises(ValueError, match=r"^count must be a non-negative number, got inf\.$"):
        check_number("count", float("inf"), 0, None, what="a non-negative number")
    with pytest.raises(ValueError, match="got nan"):
        check_number("count", float("nan"), 0, None)
    check_number("count", 10**400, 0, None, integer=True)  # a huge int is finite (no OverflowError from math)
    for name in ("verify_fraction", "max_unaligned", "acceptance_cosine", "attention_max_error", "max_error_rate"):
        for value in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError, match=name):
                LayerCacheConfig(strategy="semantic", **{name: value})


SIMILARITY_FIELDS = ("backend", "backend_kwargs", "threshold")


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_bytes("512MB") == 512_000_000
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("1.5kb") == 1500
    assert parse_bytes(123) == 123
    assert parse_bytes(None) is None
    assert LayerCacheConfig(max_memory="1MB").max_memory_bytes == 1_000_000


def test_json_round_trip_and_unknown_keys_of_a_saved_file_warn(tmp_path):
    config = LayerCacheConfig(
        strategy="semantic", threshold=[0.8, 0.9], layers=[0, 1], max_memory="2GB", namespace="team"
    )
    path = tmp_path / "c.json"
    config.to_json_file(path)
    assert LayerCacheConfig.from_json_file(path) == config
    path.write_text(json.dumps({**config.to_dict(), "newer_field": 3}))  # what a newer version may have written
    with pytest.warns(UserWarning, match="Ignoring unknown layer cache config key 'newer_field'"):
        assert LayerCacheConfig.from_json_file(path) == config
    with pytest.warns(UserWarning, match="newer_field"):
        restored = LayerCacheConfig.from_dict({**config.to_dict(), "newer_field": 3}, strict=False)
    assert restored == config
    assert config.threshold_for(1) == 0.9
    with pytest.raises(ValueError, match="one threshold per cached layer"):
        config.threshold_for(2)


def test_fields_the_selected_strategy_does_not_read_are_warned_about():
    unread = r"LayerCacheConfig\(strategy='exact'\) does not read threshold=0.9 \(read by 'attention', 'semantic'\)"
    with pytest.warns(UserWarning, match=unread) as caught:
        LayerCacheConfig(strategy="exact", threshold=0.9, block_size=8)
    assert "block_size=8 (read by 'prefix')" in str(caught[0].message) and caught[0].filename == __file__
    semantic = LayerCacheConfig(strategy="semantic", threshold=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fields the strategy reads, defaults, a saved config read back: silent
        LayerCacheConfig(strategy="prefix", block_size=8, verify_fraction=0.1)
        LayerCacheConfig.from_dict(semantic.to_dict())
        LayerCacheConfig()
    with pytest.warns(UserWarning, match="does not read threshold=0.8"):
        dataclasses.replace(semantic, strategy="exact")


def test_an_unknown_key_given_by_the_user_is_an_error_naming_the_closest_field(tmp_path):
    typo = r"^Unknown layer cache config key 'max_memroy' \(did you mean 'max_memory'\?\)"
    with pytest.raises(ValueError, match=typo):
        LayerCacheConfig.from_dict({"max_memroy": "1GB"})
    with pytest.raises(ValueError, match=r"keys 'nothing_like_it', 'threshhold' \(did you mean 'threshold'\?\);"):
        LayerCacheConfig.from_dict({"threshhold": 0.9, "nothing_like_it": 1, "strategy": "semantic"})
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"strategy": "exact", "max_entires": 5}))
    with pytest.raises(ValueError, match="did you mean 'max_entries'"):
        LayerCacheConfig.from_json_file(path, strict=True)  # a file a person wrote (the CLI's --config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known keys: neither an error nor a warning
        assert LayerCacheConfig.from_dict({"max_memory": "1GB"}).max_memory_bytes == 10**9


def test_each_field_is_declared_once_and_the_inspect_table_reads_the_declarations():
    common = {field.name for field in dataclasses.fields(LayerCacheConfig)} - {"options"}
    every = set(LayerCacheConfig().to_dict()) | {"integrity_key"}
    sections = {name: hf_layercache.get_strategy(name).config_class for name in BUILTIN_STRATEGIES}
    own = [name for section in sections.values() for name in section.field_names()]
    assert len(own) == len(set(own)) and not set(own) & common  # declared once
    assert common | set(own) == every
    for name, section in sections.items():
        assert strategy_section(name) is section  # the torch-free table reads the strategy's own declaration
        assert set(strategy_fields(name)) == set(section.reads) | set(section.field_names())
        # the similarity fields belong to exactly the strategies whose banks search by similarity
        decoder = name in ("prefix", "segment")
        options = {"strategy": name, **({"segment_separator": [7]} if name == "segment" else {})}
        model = hf_layercache.enable(tiny_model("llama" if decoder else "bert"), options)
        searches = any(bank.backend is not None for bank in model.layer_cache.banks.values())
        assert searches == (set(SIMILARITY_FIELDS) <= set(section.reads)), name
    assert set(common_fields()) == common - {name for s in sections.values() for name in s.reads}


def test_a_third_party_strategy_declares_its_own_fields():
    @dataclasses.dataclass
    class ShoutConfig(hf_layercache.config.StrategyConfig):
        loudness: int = 3
        """How loud."""

        def __post_init__(self) -> None:
            if not isinstance(self.loudness, int) or self.loudness < 0:
                raise ValueError(f"loudness must be a non-negative int, got {self.loudness!r}.")

    class Shout(hf_layercache.get_strategy("exact")):
        config_class = ShoutConfig

    hf_layercache.register_strategy("shout-test", Shout, overwrite=True)
    try:
        config = LayerCacheConfig(strategy="shout-test", loudness=5)
        assert config.loudness == 5 and config.to_dict()["loudness"] == 5
        assert LayerCacheConfig.from_dict(config.to_dict()) == config
        assert LayerCacheConfig().loudness == 3  # every registered strategy's fields, with their defaults
        with pytest.raises(ValueError, match="loudness must be a non-negative int"):
            LayerCacheConfig(loudness=-1)
        model = hf_layercache.enable(tiny_model("bert"), config)
        assert model.layer_cache.strategy.options == ShoutConfig(loudness=5)
    finally:
        STRATEGIES.unregister("shout-test")
    with pytest.raises(ValueError, match="Unknown layer cache config key 'loudness'"):
        LayerCacheConfig(loudness=5)


def test_registries_list_get_and_accept_new_names():
    assert "exact" in hf_layercache.available_strategies()
    assert {"exact"} <= set(hf_layercache.available_backends())
    assert {"lru"} <= set(hf_layercache.available_policies())
    assert hf_layercache.get_strategy("exact") is hf_layercache.strategies.exact.strategy.ExactStrategy
    with pytest.raises(ValueError, match="Unknown backend 'nope'; available: "):
        hf_layercache.get_backend("nope")

    class MyPolicy(hf_layercache.get_policy("lru")):
        pass

    hf_layercache.register_policy("my-lru", MyPolicy)
    assert LayerCacheConfig(policy="my-lru").policy == "my-lru"
    with pytest.raises(ValueError, match="already registered"):
        hf_layercache.register_policy("my-lru", type("Other", (MyPolicy,), {}))
