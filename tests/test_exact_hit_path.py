"""The pieces a full exact hit runs through, made cheaper for #33 item 4, keep their guarantees.

The model watch reads version counters from the watched tensors themselves (subclass ``__torch_function__`` off)
and skips empty slots; the bank finds and reads an entry under one hold of its lock and reads entries that never
change once; the request gate takes a plain lock and wakes a reconfiguration only when one waits.
"""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from hf_layercache.bank import CacheBank
from hf_layercache.entries import TensorEntry
from hf_layercache.inflight import InFlightRequests
from hf_layercache.policies.lru import LRUPolicy
from hf_layercache.strategies.exact.outputs import RequestEntry
from hf_layercache.watch import ModelWatch


def _watched() -> tuple[nn.Module, ModelWatch]:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4), nn.Linear(4, 4))  # bias=False: a None slot
    watch = ModelWatch(model, [model])
    watch.attach()
    return model, watch


def test_the_watch_sees_every_write_route_with_empty_slots_among_the_tensors():
    model, watch = _watched()
    try:
        assert watch.changed() is None and watch.changed() is None
        with torch.inference_mode():
            assert watch.changed() is None  # read inside a request's inference mode too
        writes = [
            lambda: model[2].weight.data.mul_(2.0),  # .data shares the counter while watched
            lambda: model[1].weight.add_(1.0),
            lambda: model[0].weight.detach().zero_(),  # an alias: the same counter
            lambda: model[2]._parameters.__setitem__("bias", nn.Parameter(torch.ones(4))),  # no registration hook
            lambda: model[0]._parameters.__setitem__("bias", nn.Parameter(torch.ones(4))),  # a None slot filled
        ]
        for write in writes:
            with torch.no_grad():
                write()
            assert watch.changed() == "model"
            assert watch.changed() is None
    finally:
        watch.detach()
    assert type(model[0].weight) is nn.Parameter


def test_find_entry_is_find_and_get_and_reads_unchanging_entries_once():
    bank: CacheBank[RequestEntry] = CacheBank("request", LRUPolicy(), entry_type=RequestEntry)
    entry_id = bank.put(RequestEntry({"x": torch.ones(3)}, (3, 0, 3)), digest=b"a" * 32, namespace=7)
    found = bank.find_entry(b"a" * 32, 7)
    assert found is not None and found[0] == entry_id == bank.find(b"a" * 32)
    assert found[1].layout == (3, 0, 3) and torch.equal(found[1].fields["x"], torch.ones(3))
    assert bank.find_entry(b"a" * 32, 7)[1] is found[1]  # read once
    assert bank.get(entry_id, 7) is found[1]
    assert bank.find_entry(b"b" * 32, 7) is None
    assert bank.find_entry(b"a" * 32, 8) is None  # another tenant's
    assert bank.find_entry(b"a" * 32) is not None  # any tenant's
    bank.remove(entry_id)
    assert bank.find_entry(b"a" * 32, 7) is None


def test_entries_that_may_change_are_read_again_each_time():
    bank: CacheBank[TensorEntry] = CacheBank("layer", LRUPolicy())
    entry_id = bank.put(TensorEntry(x=torch.ones(2)), digest=b"c" * 32)
    _, first = bank.find_entry(b"c" * 32)
    assert bank.get(entry_id) is not first


def test_the_gate_lets_requests_share_it_and_a_reconfiguration_wait_for_them():
    gate = InFlightRequests()
    events: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def request() -> None:
        with gate.request(), gate.request():  # nested calls of the same thread
            inside.set()
            release.wait(5)
            events.append("request ends")

    def reconfigure() -> None:
        with gate.reconfiguration("clear()"):
            events.append("reconfigured")

    reader = threading.Thread(target=request)
    reader.start()
    assert inside.wait(5)
    writer = threading.Thread(target=reconfigure)
    writer.start()
    deadline = time.monotonic() + 5
    while not gate.reconfiguring and time.monotonic() < deadline:
        time.sleep(0.001)
    assert gate.reconfiguring and not events  # waits for the request in flight

    def late_request() -> None:
        with gate.request():
            events.append("late request")

    late = threading.Thread(target=late_request)
    late.start()
    time.sleep(0.05)
    assert not events  # a request arriving meanwhile waits for the reconfiguration
    release.set()
    for thread in (reader, writer, late):
        thread.join(5)
    assert events == ["request ends", "reconfigured", "late request"]


def test_a_reconfiguration_inside_a_request_is_refused_and_its_own_requests_pass():
    gate = InFlightRequests()
    with gate.request():
        try:
            with gate.reconfiguration("clear()"):
                pass
        except RuntimeError as err:
            assert "inside a request" in str(err)
        else:
            raise AssertionError("a reconfiguration inside a request must be refused")
    with gate.reconfiguration("load()"), gate.request():  # e.g. a warm-up the reconfiguration runs
        pass
    assert not gate.reconfiguring
