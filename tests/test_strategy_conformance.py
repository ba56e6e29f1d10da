"""Strategies: the shared conformance suite (``hf_layercache.testing.strategies``) over every registered strategy and
a variant, a third-party strategy registered as users register theirs, and a broken one the suite must catch."""

from __future__ import annotations

import pytest

import hf_layercache
from hf_layercache.registry import STRATEGIES
from hf_layercache.testing.strategies import CHECKS, check_outputs_match_uncached, check_strategy

# Config fields that let each strategy store from the first request: the attention strategy's gate decides from
# timings (the checks never depend on them), and the checks' prompts are 12 tokens, three prefix blocks of 4.
FIELDS = {
    "attention": {"attention_gate_interval": 0},
    "prefix": {"block_size": 4},
    "segment": {"segment_separator": [7]},  # token ids: the tiny models have no tokenizer
}
VARIANTS = {"semantic": [{"reuse": "residual"}]}  # the other way semantic serves a hit
CONFIGS = [(name, name, FIELDS.get(name, {})) for name in hf_layercache.available_strategies()] + [
    (name + "".join(f"-{key}={value}" for key, value in fields.items()), name, {**FIELDS.get(name, {}), **fields})
    for name, variants in VARIANTS.items()
    if name in hf_layercache.available_strategies()
    for fields in variants
]

KNOWN_FAILURES: dict[tuple[str, str], str] = {}
"""(strategy, check) -> why it fails: a strict xfail, so a fix shows."""


def _cases() -> list:
    cases = []
    for config_id, name, fields in CONFIGS:
        for check in CHECKS:
            reason = KNOWN_FAILURES.get((name, check.__name__))
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
            cases.append(pytest.param(name, fields, check, id=f"{config_id}-{check.__name__}", marks=marks))
    return cases


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registry(monkeypatch):
    """Strategies a test registers are gone when it ends (the registry has no public unregister)."""
    monkeypatch.setattr(STRATEGIES, "_classes", dict(STRATEGIES._classes))


def test_builtin_strategies_are_registered():
    assert {"exact", "prefix", "semantic", "attention"} <= set(hf_layercache.available_strategies())


@pytest.mark.parametrize(("name", "fields", "check"), _cases())
def test_conformance(name, fields, check, record_property):
    figures = check(name, **fields)
    if figures:  # an approximate strategy's fidelity: reported (junit XML, -rA), never judged
        record_property("figures", figures)


@pytest.mark.parametrize("base", ["exact", "prefix"])
def test_a_third_party_strategy_passes_the_suite(base, registry):
    class ThirdParty(hf_layercache.get_strategy(base)):
        lossless = True
        tolerance = 1e-4

    name = f"conformance-test-{base}"
    hf_layercache.register_strategy(name, ThirdParty)
    results = check_strategy(name, **FIELDS.get(base, {}))
    assert [check.__name__ for check in CHECKS] == list(results)


def test_the_suite_catches_a_strategy_that_changes_outputs(registry):
    class Off(hf_layercache.get_strategy("prefix")):
        lossless = True

        def forward_request(self, scope, original, arguments):
            out = super().forward_request(scope, original, arguments)
            out["logits"] = out["logits"] + 0.01
            return out

    hf_layercache.register_strategy("conformance-test-off", Off)
    with pytest.raises(AssertionError, match=r"differs from uncached by up to 0\.01"):
        check_outputs_match_uncached("conformance-test-off", block_size=4)
