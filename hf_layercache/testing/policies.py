"""Conformance suite for eviction policies: plain functions that raise ``AssertionError`` on a broken contract.

Run it on your own policy from any pytest file::

    from hf_layercache.testing.policies import check_policy

    def test_my_policy_conforms():
        check_policy(MyPolicy, {"my_kwarg": 3})

Every check takes the policy class and the ``policy_kwargs`` it is built with, as a bank would build it:
``cls(**policy_kwargs)``. They drive the policy only through its public contract, with a fixed seed, through a
small simulated bank that honours a byte budget and an entry limit the way the real one does.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..policies.base import Policy

PolicyKwargs = dict[str, Any] | None


class SimulatedBank:
    """The bank's side of the contract without tensors: sizes, a byte budget, an entry limit, and the calls.

    Every action is checked as it happens, so a broken policy fails at the first wrong answer with a message that
    says what was asked and what came back.
    """

    def __init__(self, policy: Policy, max_bytes: int = 20_000, max_entries: int = 40) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.sizes: dict[int, int] = {}
        self.evicted: list[list[int]] = []
        self._next_id = 0

    @property
    def used(self) -> int:
        return sum(self.sizes.values())

    def insert(self, nbytes: int, cost: float) -> int:
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self.make_room(nbytes)
        self.sizes[entry_id] = nbytes
        self.policy.on_insert(entry_id, nbytes, cost)
        self.check_in_sync()
        return entry_id

    def remove(self, entry_id: int) -> None:
        del self.sizes[entry_id]
        self.policy.on_remove(entry_id)

    def make_room(self, nbytes: int) -> None:
        name = type(self.policy).__name__
        while self.sizes and (len(self.sizes) + 1 > self.max_entries or self.used + nbytes > self.max_bytes):
            needed = self.used + nbytes - self.max_bytes
            victims = self.policy.victims(needed)
            check_victims(self.policy, victims, needed, self.sizes)
            self.evicted.append(victims)
            for victim in victims:
                self.remove(victim)
        assert len(self.sizes) + 1 <= self.max_entries, f"{name}: the entry limit cannot be met."
        assert self.used + nbytes <= self.max_bytes, f"{name}: the byte budget cannot be met."

    def check_in_sync(self) -> None:
        name = type(self.policy).__name__
        assert len(self.policy) == len(self.sizes), (
            f"{name}: len(policy) is {len(self.policy)} but the bank holds {len(self.sizes)} entries."
        )
        order = list(self.policy.eviction_order())
        assert sorted(order) == sorted(self.sizes), (
            f"{name}: eviction_order() lists {sorted(order)[:10]}..., the bank holds {sorted(self.sizes)[:10]}..."
        )

    def step(self, rng: random.Random) -> None:
        """One random event: insert, hit, miss, verified error, or a removal the policy did not ask for."""
        ids = sorted(self.sizes)
        action = rng.random()
        if action < 0.35 or not ids:
            self.insert(rng.choice([0, rng.randint(1, 2_000)]), rng.choice([0.0, rng.uniform(1e-4, 1e-2)]))
        elif action < 0.7:
            self.policy.on_hit(rng.choice(ids[-20:] if rng.random() < 0.7 else ids), rng.uniform(0.8, 1.0))
        elif action < 0.8:
            self.policy.on_miss()
        elif action < 0.95:
            self.policy.on_error(rng.choice(ids), rng.choice([0.0, rng.uniform(0.0, 0.3)]))
        else:
            self.remove(rng.choice(ids))


def check_victims(policy: Policy, victims: list[int], needed: int, sizes: dict[int, int]) -> None:
    """Assert ``victims`` is a valid answer to ``victims(needed)`` for a bank holding ``sizes`` (id -> bytes)."""
    name = type(policy).__name__
    asked = f"{name}.victims({needed}) returned {victims[:10]}"
    assert isinstance(victims, list), f"{asked}: expected a list of ids."
    if not sizes:
        assert victims == [], f"{asked} for an empty bank; expected []."
        return
    assert victims, f"{asked} while {len(sizes)} entries are tracked; expected at least one id."
    assert len(set(victims)) == len(victims), f"{asked}: ids repeat."
    unknown = [v for v in victims if v not in sizes]
    assert not unknown, f"{asked}: {unknown} are not entries of the bank."
    freed = sum(sizes[v] for v in victims)
    assert freed >= needed or len(victims) == len(sizes), (
        f"{asked}: they free {freed} bytes, not the {needed} needed, yet other entries remain."
    )
    assert freed - sizes[victims[-1]] < needed or len(victims) == 1, (
        f"{asked}: the ids before the last already free {freed - sizes[victims[-1]]} >= {needed} bytes."
    )
    order = list(policy.eviction_order())
    assert victims == order[: len(victims)], f"{asked}, but eviction_order() starts {order[: len(victims)]}."


def check_constructible(policy_cls: type[Policy], policy_kwargs: PolicyKwargs = None) -> None:
    """The class builds from ``policy_kwargs``, starts empty and makes a valid claim about hits."""
    policy = policy_cls(**(policy_kwargs or {}))
    assert isinstance(policy, Policy), f"{policy_cls.__name__} is not a Policy subclass."
    assert len(policy) == 0, f"{policy_cls.__name__}: a new policy has len {len(policy)}, expected 0."
    assert policy.victims(0) == [] and policy.victims(1 << 40) == [], (
        f"{policy_cls.__name__}: an empty policy named victims."
    )
    assert policy_cls.promotes_on_hit in (True, False, None), (
        f"{policy_cls.__name__}.promotes_on_hit must be True, False or None, got {policy_cls.promotes_on_hit!r}."
    )


def check_ignores_unknown_ids(policy_cls: type[Policy], policy_kwargs: PolicyKwargs = None) -> None:
    """Events about ids that are not tracked (removed a moment ago) are ignored, not errors or new entries."""
    policy = policy_cls(**(policy_kwargs or {}))
    policy.on_insert(1, 10, 0.001)
    for event in (lambda: policy.on_hit(99, 1.0), lambda: policy.on_error(99, 0.1), lambda: policy.on_remove(99)):
        event()
    policy.on_miss()
    assert len(policy) == 1 and 99 not in policy, f"{policy_cls.__name__}: events for an unknown id changed it."
    assert policy.victims(0) == [1], f"{policy_cls.__name__}.victims(0) is {policy.victims(0)}, expected [1]."


def check_rejects_bad_inserts(policy_cls: type[Policy], policy_kwargs: PolicyKwargs = None) -> None:
    """A negative size or cost is a bug in the caller and raises ``ValueError``."""
    policy = policy_cls(**(policy_kwargs or {}))
    for nbytes, cost in ((-1, 0.0), (10, -1.0), (10, float("nan"))):
        try:
            policy.on_insert(1, nbytes, cost)
        except ValueError:
            continue
        raise AssertionError(f"{policy_cls.__name__}.on_insert(1, {nbytes}, {cost}) did not raise ValueError.")
    assert len(policy) == 0, f"{policy_cls.__name__}: a rejected insert was tracked."


def check_victims_valid(policy_cls: type[Policy], policy_kwargs: PolicyKwargs = None) -> None:
    """For many byte amounts, victims are existing entries, free enough and no more, and follow eviction_order();
    asking changes nothing."""
    policy = policy_cls(**(policy_kwargs or {}))
    bank = SimulatedBank(policy, max_bytes=10**9, max_entries=10**6)
    rng = random.Random(0)
    for _ in range(300):
        bank.step(rng)
    before = list(policy.eviction_order())
    for needed in (-5, 0, 1, 500, 5_000, bank.used // 2, bank.used, bank.used + 1):
        victims = policy.victims(needed)
        check_victims(policy, victims, needed, bank.sizes)
        assert policy.victims(needed) == victims, f"{policy_cls.__name__}.victims({needed}) changed when asked again."
    assert list(policy.eviction_order()) == before, f"{policy_cls.__name__}: victims() changed the eviction order."
    bank.check_in_sync()


def check_bounded(policy_cls: type[Policy], policy_kwargs: PolicyKwargs = None) -> None:
    """Under a byte budget and an entry limit, the simulated bank stays bounded using only the policy's victims."""
    policy = policy_cls(**(policy_kwargs or {}))
    bank = SimulatedBank(policy, max_bytes=20_000, max_entries=40)
    rng = random.Random(1)
    for _ in range(3_000):
        bank.step(rng)
        assert bank.used <= bank.max_bytes and len(bank.sizes) <= bank.max_entries
    bank.check_in_sync()
    assert len(bank.evicted) > 100, f"{policy_cls.__name__}: the bounded run evicted only {len(bank.evicted)} times."


def check_remove_and_reinsert(policy_cls: type[Policy], policy_kwargs: PolicyKwargs = None) -> None:
    """A removed entry is never named again; re-inserting an id tracks it once, with its new size."""
    policy = policy_cls(**(policy_kwargs or {}))
    for entry_id in range(5):
        policy.on_insert(entry_id, 100, 0.001)
    first = policy.victims(0)[0]
    policy.on_remove(first)
    assert first not in policy and first not in policy.eviction_order(), (
        f"{policy_cls.__name__}: entry {first} is still tracked after on_remove."
    )
    assert first not in policy.victims(10**9), f"{policy_cls.__name__}: removed entry {first} named as a victim."
    policy.on_insert(4, 7, 0.001)
    policy.on_insert(4, 1_000, 0.001)
    assert len(policy) == 4, f"{policy_cls.__name__}: re-inserting id 4 gives len {len(policy)}, expected 4."
    check_victims(policy, policy.victims(10**9), 10**9, {i: 100 for i in range(5) if i != first} | {4: 1_000})


def check_hit_order(policy_cls: type[Policy], policy_kwargs: PolicyKwargs = None) -> None:
    """Hits move the hit entry later in the eviction order (``promotes_on_hit=True``), change nothing (``False``),
    or are not checked (``None``). Misses never reorder entries."""
    claim = policy_cls.promotes_on_hit
    name = policy_cls.__name__
    policy = policy_cls(**(policy_kwargs or {}))
    for entry_id in range(6):
        policy.on_insert(entry_id, 100, 0.001)
    rng = random.Random(2)
    for _ in range(40):
        before = list(policy.eviction_order())
        policy.on_miss()
        assert list(policy.eviction_order()) == before, f"{name}: on_miss() reordered {before}."
        hit = before[0] if rng.random() < 0.5 else rng.choice(before)
        policy.on_hit(hit, 1.0)
        after = list(policy.eviction_order())
        if claim is False:
            assert after == before, f"{name} claims hits do not reorder, but hitting {hit} turned {before} to {after}."
        elif claim is True:
            assert after.index(hit) >= before.index(hit), (
                f"{name}: hitting {hit} moved it earlier: {before} -> {after}."
            )
            if hit == before[0]:
                assert after[0] != hit, f"{name}: the first victim {hit} is still first after a hit: {after}."


def check_state_round_trip(policy_cls: type[Policy], policy_kwargs: PolicyKwargs = None) -> None:
    """``state_dict()`` is tensors only, survives safetensors, restores the same order into a fresh policy, and the
    restored policy then behaves exactly like the original."""
    name = policy_cls.__name__
    original = policy_cls(**(policy_kwargs or {}))
    bank = SimulatedBank(original)
    rng = random.Random(3)
    for _ in range(500):
        bank.step(rng)
    state = original.state_dict()
    for key, value in state.items():
        assert isinstance(key, str) and isinstance(value, torch.Tensor), (
            f"{name}.state_dict()[{key!r}] is a {type(value).__name__}; only tensors under string names are allowed."
        )
    restored = policy_cls(**(policy_kwargs or {}))
    restored.on_insert(10**9, 5, 0.001)  # loading replaces what was there
    restored.load_state_dict(load_safetensors(save_safetensors(state)))
    assert list(restored.eviction_order()) == list(original.eviction_order()), f"{name}: order changed on reload."
    again = restored.state_dict()
    assert state.keys() == again.keys() and all(_same(state[k], again[k]) for k in state), (
        f"{name}: state_dict() after load_state_dict() differs from the one loaded."
    )
    twin = SimulatedBank(restored)
    twin.sizes, twin._next_id, bank.evicted = dict(bank.sizes), bank._next_id, []
    for step in range(500):
        seed = rng.random()
        bank.step(random.Random(seed))
        twin.step(random.Random(seed))
        assert twin.evicted == bank.evicted, f"{name}: the restored policy evicts differently, {step} steps on."
    assert list(restored.eviction_order()) == list(original.eviction_order()), f"{name}: orders diverged."


def check_rejects_bad_state(policy_cls: type[Policy], policy_kwargs: PolicyKwargs = None) -> None:
    """Loading a state with a tensor missing, or ids of the wrong length, raises ``ValueError`` and changes nothing."""
    name = policy_cls.__name__
    source = policy_cls(**(policy_kwargs or {}))
    for entry_id in range(4):
        source.on_insert(entry_id, 100, 0.001)
        source.on_error(entry_id, 0.2)
    state = source.state_dict()
    target = policy_cls(**(policy_kwargs or {}))
    target.on_insert(7, 10, 0.001)
    broken = {f"without {key!r}": {k: v for k, v in state.items() if k != key} for key in state}
    broken["with one id too few"] = {**state, "ids": state["ids"][:-1]}
    broken["with text instead of tensors"] = dict.fromkeys(state, "garbage")
    for what, bad in broken.items():
        try:
            target.load_state_dict(bad)
        except ValueError:
            assert list(target.eviction_order()) == [7], f"{name}: a refused state {what} changed the policy."
            continue
        raise AssertionError(f"{name}.load_state_dict accepted a state {what}; expected ValueError.")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values, NaN equal to NaN (a policy may use NaN for "no value yet")."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


CHECKS: tuple[Callable[[type[Policy], PolicyKwargs], None], ...] = (
    check_constructible,
    check_ignores_unknown_ids,
    check_rejects_bad_inserts,
    check_victims_valid,
    check_bounded,
    check_remove_and_reinsert,
    check_hit_order,
    check_state_round_trip,
    check_rejects_bad_state,
)
"""Every check, for ``pytest.mark.parametrize`` when you want one test per check."""


def check_policy(policy_cls: type[Policy], policy_kwargs: PolicyKwargs = None) -> None:
    """Run every check in :data:`CHECKS` on ``policy_cls`` built with ``policy_kwargs``."""
    for check in CHECKS:
        check(policy_cls, policy_kwargs)
