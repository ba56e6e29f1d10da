"""Eviction policies: the shared conformance suite over every registered policy, then each policy's own promises."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

import hf_layercache
from hf_layercache.policies import (
    CostPolicy,
    DivergencePolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    Policy,
    ScoredPolicy,
    StalenessPolicy,
)
from hf_layercache.testing.policies import CHECKS, SimulatedBank, check_policy


def filled(policy: Policy, n: int, nbytes: int = 100, cost: float = 1.0) -> Policy:
    for entry_id in range(n):
        policy.on_insert(entry_id, nbytes, cost)
    return policy


def order(policy: Policy) -> list[int]:
    return list(policy.eviction_order())


# --- conformance ----------------------------------------------------------------------------------------------------


def test_builtin_policies_are_registered():
    names = set(hf_layercache.available_policies())
    assert {"lru", "lfu", "fifo", "staleness", "divergence", "cost"} <= names
    assert hf_layercache.get_policy("staleness") is StalenessPolicy


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", hf_layercache.available_policies())
def test_conformance(name, check):
    check(hf_layercache.get_policy(name), None)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (StalenessPolicy, {"half_life": 0.5}),
        (StalenessPolicy, {"half_life": 1e9}),
        (DivergencePolicy, {"alpha": 1.0, "tolerance": 0.0}),
        (DivergencePolicy, {"alpha": 0.01, "tolerance": 10.0}),
        (CostPolicy, {"default_cost": 1e-6}),
    ],
)
def test_conformance_with_kwargs(cls, kwargs):
    check_policy(cls, kwargs)


class LargestFirstPolicy(ScoredPolicy):
    """A third-party policy as docs/policies.md writes one: the biggest entry goes first, hits change nothing."""

    promotes_on_hit = False

    def _track(self, entry_id: int, cost: float) -> None:
        self._score(entry_id, -float(self._nbytes[entry_id]))


def test_suite_passes_a_third_party_policy():
    check_policy(LargestFirstPolicy)
    policy = LargestFirstPolicy()
    for entry_id, nbytes in enumerate([10, 300, 20]):
        policy.on_insert(entry_id, nbytes)
    assert policy.victims(0) == [1]


class NamesStrangers(LRUPolicy):
    def victims(self, nbytes_needed: int) -> list[int]:
        return [*super().victims(nbytes_needed), 10**6] if self._order else []


class IgnoresHits(LRUPolicy):
    def on_hit(self, entry_id: int, similarity: float = 1.0) -> None:
        pass


class ForgetsCounts(LFUPolicy):
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        Policy.load_state_dict(self, state)


class FreesTooLittle(FIFOPolicy):
    def victims(self, nbytes_needed: int) -> list[int]:
        return super().victims(0)


@pytest.mark.parametrize(
    ("broken", "complaint"),
    [
        (NamesStrangers, "1000000"),
        (IgnoresHits, "still first after a hit"),
        (ForgetsCounts, "differs from the one loaded"),
        (FreesTooLittle, "not the"),
    ],
)
def test_suite_catches_broken_policies(broken, complaint):
    with pytest.raises(AssertionError, match=complaint):
        check_policy(broken)


@pytest.mark.parametrize("name", hf_layercache.available_policies())
def test_victims_stay_fast_with_many_entries(name):
    """20,000 entries, 2,000 evictions with hits between: a sort of every entry per eviction would take ~20 s."""
    policy = filled(hf_layercache.get_policy(name)(), 20_000)
    rng = random.Random(0)
    start = time.perf_counter()
    for new_id in range(20_000, 22_000):
        for _ in range(3):
            policy.on_hit(rng.randrange(new_id - 20_000, new_id), 1.0)
        (victim,) = policy.victims(100)
        policy.on_remove(victim)
        policy.on_insert(new_id, 100, 1.0)
    assert len(policy) == 20_000
    assert time.perf_counter() - start < 4.0


# --- lru, fifo, lfu -------------------------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used():
    policy = filled(LRUPolicy(), 3)
    policy.on_hit(0)
    assert order(policy) == [1, 2, 0]
    assert policy.victims(150) == [1, 2]


def test_fifo_ignores_hits_and_requeues_reinserts():
    policy = filled(FIFOPolicy(), 3)
    policy.on_hit(0)
    policy.on_hit(0)
    assert order(policy) == [0, 1, 2]
    policy.on_insert(0, 100)
    assert order(policy) == [1, 2, 0]


def test_lfu_counts_hits_and_breaks_ties_by_recency():
    policy = filled(LFUPolicy(), 3)
    for entry_id in (2, 2, 0):
        policy.on_hit(entry_id)
    assert order(policy) == [1, 0, 2]
    policy.on_hit(1)
    policy.on_hit(1)
    assert order(policy) == [0, 2, 1]  # 1 and 2 both have 3 uses; 2 was used longer ago


def test_lfu_forgets_counts_of_removed_entries():
    policy = filled(LFUPolicy(), 2)
    for _ in range(5):
        policy.on_hit(0)
    policy.on_remove(0)
    policy.on_insert(0, 100)
    assert order(policy) == [1, 0]


# --- staleness ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "10", True, None])
def test_staleness_rejects_bad_half_life(bad):
    with pytest.raises(ValueError, match="half_life must be a finite number > 0"):
        StalenessPolicy(half_life=bad)


def test_staleness_rate_halves_every_half_life_of_lookups():
    policy = StalenessPolicy(half_life=4)
    policy.on_insert(0, 100)
    fresh = policy.match_rate(0)
    assert fresh == pytest.approx(1 - 2 ** (-1 / 4))
    policy.on_insert(1, 100)  # inserts and removals are not lookups: the clock stands still
    policy.on_remove(1)
    assert policy.match_rate(0) == fresh
    for _ in range(4):
        policy.on_miss()
    assert policy.match_rate(0) == pytest.approx(fresh / 2)
    policy.on_hit(0)
    assert policy.match_rate(0) == pytest.approx(fresh * (2 ** (-5 / 4) + 1))


def test_staleness_drops_an_entry_once_its_old_hits_have_decayed():
    """Entry 0 is used 8 times at clock 0..7; entry 1 is stored later at clock T. 0 goes first exactly when
    sum(2 ** (t / h)) over 0's uses falls below 2 ** (T / h)."""
    half_life = 10
    crossover = math.floor(half_life * math.log2(sum(2 ** (t / half_life) for t in range(8)))) + 1
    for clock, first in ((crossover - 1, 1), (crossover, 0)):
        policy = StalenessPolicy(half_life=half_life)
        policy.on_insert(0, 100)
        for _ in range(7):
            policy.on_hit(0)
        for _ in range(clock - 7):
            policy.on_miss()
        policy.on_insert(1, 100)
        assert policy.victims(0) == [first], f"at clock {clock}"


def random_events(policies: list[Policy], steps: int = 400, seed: int = 0) -> None:
    """The same random inserts, hits and misses on every policy (no evictions)."""
    rng = random.Random(seed)
    for step in range(steps):
        action = rng.random()
        if action < 0.3 or step == 0:
            for p in policies:
                p.on_insert(step, 100)
        elif action < 0.85:
            target = rng.choice(order(policies[0]))
            for p in policies:
                p.on_hit(target)
        else:
            for p in policies:
                p.on_miss()


def test_staleness_spans_lru_and_lfu():
    forgetful, lru = StalenessPolicy(half_life=1e-3), LRUPolicy()
    patient, lfu = StalenessPolicy(half_life=1e12), LFUPolicy()
    random_events([forgetful, lru, patient, lfu])
    assert order(forgetful) == order(lru)
    counts = {i: lfu._current(i) for i in order(lfu)}
    in_patient_order = [counts[i] for i in order(patient)]
    assert in_patient_order == sorted(in_patient_order)


def test_staleness_load_with_another_half_life_keeps_current_rates():
    saved = StalenessPolicy(half_life=8)
    random_events([saved], steps=100)
    loaded = StalenessPolicy(half_life=100)
    loaded.load_state_dict(saved.state_dict())
    assert order(loaded) == order(saved)
    for entry_id in order(saved):
        decayed = saved.match_rate(entry_id) / (1 - 2 ** (-1 / 8))
        assert loaded.match_rate(entry_id) / (1 - 2 ** (-1 / 100)) == pytest.approx(decayed)


# --- divergence -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"tolerance": -0.1}, "tolerance"),
        ({"tolerance": "x"}, "tolerance"),
    ],
)
def test_divergence_rejects_bad_kwargs(kwargs, message):
    with pytest.raises(ValueError, match=f"DivergencePolicy: {message} must be"):
        DivergencePolicy(**kwargs)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_divergence_rejects_bad_errors(bad):
    policy = filled(DivergencePolicy(), 1)
    with pytest.raises(ValueError, match="error must be a finite relative error"):
        policy.on_error(0, bad)


def test_divergence_drops_growing_error_first_worst_first():
    policy = filled(DivergencePolicy(alpha=0.5, tolerance=0.05), 4)
    policy.on_error(3, 0.01)  # verified and fine: ranked by recency like the unverified ones
    policy.on_error(2, 0.10)
    policy.on_error(2, 0.30)
    policy.on_error(1, 0.08)
    assert policy.error(2) == pytest.approx(0.2)
    assert policy.error(0) is None
    assert order(policy) == [2, 1, 0, 3]
    policy.on_hit(2)  # a hit does not excuse a diverging entry
    assert order(policy)[0] == 2


def test_divergence_entry_recovers_when_its_error_falls():
    policy = filled(DivergencePolicy(alpha=0.5, tolerance=0.05), 3)
    policy.on_error(2, 0.2)
    assert order(policy)[0] == 2
    for _ in range(3):
        policy.on_error(2, 0.0)
    assert policy.error(2) == pytest.approx(0.025)
    assert order(policy) == [0, 1, 2]


def test_divergence_without_errors_is_lru():
    divergence, lru = DivergencePolicy(), LRUPolicy()
    random_events([divergence, lru])
    assert order(divergence) == order(lru)


def test_divergence_load_rescores_with_its_own_tolerance():
    saved = filled(DivergencePolicy(tolerance=0.05), 3)
    saved.on_error(1, 0.1)
    strict, lenient = DivergencePolicy(tolerance=0.0), DivergencePolicy(tolerance=0.5)
    for policy in (strict, lenient):
        policy.load_state_dict(saved.state_dict())
        assert policy.error(1) == pytest.approx(0.1) and policy.error(0) is None
    assert order(strict) == [1, 0, 2] and order(lenient) == [0, 1, 2]


# --- cost (GDSF) ----------------------------------------------------------------------------------------------------


def test_cost_orders_by_frequency_times_cost_per_byte():
    policy = CostPolicy()
    policy.on_insert(0, 100, 1.0)  # H = 0.01
    policy.on_insert(1, 200, 1.0)  # H = 0.005: twice the bytes for the same saving
    policy.on_insert(2, 100, 3.0)  # H = 0.03: saves more compute
    assert order(policy) == [1, 0, 2]
    policy.on_hit(1)
    policy.on_hit(1)  # H = 3 * 1.0 / 200 = 0.015
    assert order(policy) == [0, 1, 2]


def test_cost_inflation_rises_to_the_evicted_value_only_on_eviction():
    policy = CostPolicy()
    policy.on_insert(0, 100, 1.0)
    policy.on_insert(1, 100, 5.0)
    policy.on_insert(2, 200, 3.0)  # H = 0.015
    policy.on_remove(1)  # not proposed by victims(): removal for another reason does not age the bank
    assert policy.inflation == 0.0
    assert policy.victims(0) == [0]
    policy.on_remove(0)
    assert policy.inflation == pytest.approx(0.01)
    policy.on_insert(3, 100, 1.0)  # H = L + 0.01 = 0.02 > 0.015
    assert order(policy) == [2, 3]


def test_cost_zero_cost_means_default_cost():
    policy = CostPolicy(default_cost=2.0)
    policy.on_insert(0, 100, 0.0)  # counts as 2.0
    policy.on_insert(1, 100, 1.0)
    assert order(policy) == [1, 0]


@pytest.mark.parametrize("bad", [0, -1, math.inf])
def test_cost_rejects_bad_default_cost(bad):
    with pytest.raises(ValueError, match="CostPolicy: default_cost must be a finite number > 0"):
        CostPolicy(default_cost=bad)


def test_cost_ages_out_old_popularity_where_lfu_does_not():
    """One entry is used 50 times, then never again while fresh entries stream through a 10-entry bank."""
    survived = {}
    for policy in (CostPolicy(), LFUPolicy()):
        bank = SimulatedBank(policy, max_bytes=10**9, max_entries=10)
        star = bank.insert(100, 1.0)
        for _ in range(50):
            policy.on_hit(star)
        for _ in range(2_000):
            newcomer = bank.insert(100, 1.0)
            policy.on_hit(newcomer)
        survived[type(policy).__name__] = star in bank.sizes
    assert survived == {"CostPolicy": False, "LFUPolicy": True}


# --- base contract details ------------------------------------------------------------------------------------------


def test_victims_free_enough_bytes_in_order():
    policy = LRUPolicy()
    for entry_id, nbytes in enumerate([10, 0, 30, 40]):
        policy.on_insert(entry_id, nbytes)
    assert policy.victims(0) == [0]
    assert policy.victims(11) == [0, 1, 2]
    assert policy.victims(10**6) == [0, 1, 2, 3]


def test_state_is_tensors_that_safetensors_can_store(tmp_path):
    from safetensors.torch import load_file, save_file

    policy = filled(CostPolicy(), 5)
    policy.on_hit(3)
    save_file(policy.state_dict(), tmp_path / "policy.safetensors")
    restored = CostPolicy()
    restored.load_state_dict(load_file(tmp_path / "policy.safetensors"))
    assert order(restored) == order(policy) == [0, 1, 2, 4, 3]


def test_loading_a_state_into_another_policy_kind_is_refused():
    with pytest.raises(ValueError, match="StalenessPolicy state lacks 'clock'"):
        StalenessPolicy().load_state_dict(filled(LRUPolicy(), 2).state_dict())
