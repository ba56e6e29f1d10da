"""#30 item 4: the cache reconfigured (``disable``/``enable``, ``clear``, ``save_pretrained``, ``load``) while
requests are in flight in other threads. A request finishes on the configuration it started with, or computes
uncached: it is never wrong and never raises because of a concurrent switch, and nothing wrong stays cached.

Each round pauses a request inside a middle layer until the switch has happened (the old code) or is waiting for the
request to end (the fix): the interleaving is forced, not hoped for, and nothing is timed.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache import LayerCacheConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "exact": ("bert", {}),
    "semantic-state": ("bert", {"reuse": "state", "verify_fraction": 0.0}),
    "semantic-residual": ("bert", {"reuse": "residual", "verify_fraction": 0.0}),
    "attention": ("bert", {}),
    "prefix": ("llama", {"block_size": 4}),
}
ROUNDS = 6


def _wait_until(condition, what: str) -> None:
    """Poll ``condition`` (a correct run needs no timeout; a hung one fails after a generous bound)."""
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.001)


class PauseInside:
    """A forward pre-hook on a middle layer: the request stops there until the test lets it go on."""

    def __init__(self):
        self.armed = False
        self.inside = threading.Event()
        self.resume = threading.Event()

    def __call__(self, module, args):
        if self.armed:
            self.armed = False
            self.inside.set()
            _wait_until(self.resume.is_set, "the switch")


def _switch_waits_or_is_done(model, done: threading.Event):
    def condition() -> bool:
        controller = model.__dict__.get("layer_cache")
        requests = getattr(controller, "requests", None)  # the gate that holds switches back (inflight.py)
        return done.is_set() or (requests is not None and requests.reconfiguring)

    return condition


def _switches(model, config, tmp_path):
    """Reconfigurations a serving process does while other threads serve (``disable`` is undone after the request
    has ended, so the request may go on on a disabled model)."""

    def disable_enable():
        hf_layercache.disable(model)
        hf_layercache.enable(model, config)

    def disable():
        hf_layercache.disable(model)

    def clear():
        model.layer_cache.clear()

    def save_and_load():
        model.layer_cache.save(tmp_path / "warm")
        model.layer_cache.load(tmp_path / "warm")

    return [disable_enable, disable, clear, save_and_load]


def _request_during(switch, model, batch: dict, options: dict, pause: PauseInside) -> torch.Tensor:
    """Run ``batch`` in a thread, paused inside a middle layer while ``switch`` runs in another; its output (or what
    it raised)."""
    done, result = threading.Event(), {}
    pause.inside.clear()
    pause.resume.clear()
    pause.armed = True

    def request():
        try:
            with torch.no_grad():
                result["out"] = model(**batch, **options).last_hidden_state
        except Exception as err:
            result["error"] = err

    def switch_then_done():
        try:
            switch()
        except Exception as err:  # a switch that fails is a failure too, not a thread's warning
            result["switch error"] = err
        finally:
            done.set()

    requester = threading.Thread(target=request)
    requester.start()
    _wait_until(lambda: pause.inside.is_set() or not requester.is_alive(), "the request to be inside")
    if not pause.inside.is_set():
        raise AssertionError(f"the request ended before the layer it pauses in: {result}")
    switcher = threading.Thread(target=switch_then_done)
    switcher.start()
    _wait_until(_switch_waits_or_is_done(model, done), "the switch to start")
    pause.resume.set()
    requester.join()
    switcher.join()
    if "switch error" in result:
        raise result["switch error"]
    if "error" in result:
        raise result["error"]
    return result["out"]


def _difference(out: torch.Tensor, want: torch.Tensor, batch: dict) -> float:
    mask = batch["attention_mask"].bool()
    return (out[mask] - want[mask]).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_a_request_in_flight_is_never_served_wrong_by_a_switch(case, tmp_path):
    arch, fields = CASES[case]
    config = LayerCacheConfig(strategy=case.split("-")[0], **fields)
    model = tiny_model(arch)
    layers = model.layers if arch == "llama" else model.encoder.layer
    pause = PauseInside()
    layers[1].register_forward_pre_hook(hf_layercache.value_neutral_hook(pause))
    # a new batch for each switch: the checks after a switch store every batch so far, and a full hit calls no layer
    batches = [tiny_batch(arch, batch=2, seed=s) for s in range(ROUNDS * 4)]
    options = {"use_cache": False} if arch == "llama" else {}
    with torch.no_grad():
        expected = [model(**b, **options).last_hidden_state for b in batches]
    hf_layercache.enable(model, config)
    wrong, errors = [], []
    for round_ in range(ROUNDS):
        for turn, switch in enumerate(_switches(model, config, tmp_path)):
            k = 4 * round_ + turn
            with torch.no_grad():  # warm with row 0: the paused request serves it and computes row 1 (a full hit
                model(**{n: t[:1] for n, t in batches[k].items()}, **options)  # would not call the layers)
            try:
                out = _request_during(switch, model, batches[k], options, pause)
            except Exception as err:
                errors.append(f"round {round_} {switch.__name__}: {type(err).__name__}: {err}")
            else:
                if _difference(out, expected[k], batches[k]) > 1e-4:
                    wrong.append(
                        f"round {round_} {switch.__name__}: differs by {_difference(out, expected[k], batches[k]):.3g}"
                    )
            if "layer_cache" not in model.__dict__:
                hf_layercache.enable(model, config)
            with torch.no_grad():  # nothing wrong stays cached: every batch again, served as it is now
                for b, want in zip(batches[: k + 1], expected, strict=False):
                    if _difference(model(**b, **options).last_hidden_state, want, b) > 1e-4:
                        wrong.append(f"round {round_} after {switch.__name__}: a later request differs")
    assert errors == [] and wrong == [], (errors, wrong)


def test_a_reconfiguration_from_inside_a_request_of_the_same_model_is_refused():
    """It would wait for its own request to end: refused with the reason, and the cache still works afterwards."""
    model = hf_layercache.enable(tiny_model("bert"), LayerCacheConfig())
    batch = tiny_batch("bert")
    clear = hf_layercache.value_neutral_hook(lambda module, args: model.layer_cache.clear())
    handle = model.encoder.layer[1].register_forward_pre_hook(clear)
    with pytest.raises(RuntimeError, match=r"clear\(\) was called from inside a request"), torch.no_grad():
        model(**batch)
    handle.remove()
    with torch.no_grad():
        first = model(**batch).last_hidden_state
        again = model(**batch).last_hidden_state
    assert model.layer_cache.stats()["total"]["hits"] > 0
    assert torch.equal(first, again)
