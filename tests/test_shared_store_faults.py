"""The shared tier against peers that misbehave on purpose (#30): replies of the wrong shape, oversized values, a
writer that cannot write.

A fake Redis (:class:`FakeRedis`, a thread answering on a loopback socket) plays a broken proxy or an impostor; the
size and queue bounds are checked against a real ``redis-server`` (tests/test_shared_store.py starts it). Nothing
here depends on timing: the writer is held with ``CLIENT PAUSE WRITE``, and transfers are read from Redis's own
``INFO`` counters.
"""

from __future__ import annotations

import socket
import threading
import warnings

import pytest
import torch
from test_shared_store import _config, _run, _uncached
from tiny import tiny_batch, tiny_model

import hf_layercache
from hf_layercache.shared_store.codec import MAGIC, decode

pytest.importorskip("redis", reason="pip install 'hf-layercache[redis]'")

HELLO = b"%1\r\n$5\r\nproto\r\n:3\r\n"
"""A well-formed RESP3 answer to ``HELLO 3``."""
HANDSHAKE = {b"CLIENT": b"+OK\r\n", b"SELECT": b"+OK\r\n", b"PING": b"+PONG\r\n", b"AUTH": b"+OK\r\n"}
MISS = b"$0\r\n\r\n"
"""What ``GETRANGE`` answers for an absent key."""
CLOSE = b"<close>"
"""Marks a reply after which the fake closes the connection (mid-reply when the reply is cut short)."""


class FakeRedis:
    """A server on a free loopback port that speaks RESP but answers ``HELLO`` with ``hello`` and each other command
    with ``replies[name]`` (``default`` for the rest): a misbehaving peer, not a mock of the client."""

    def __init__(self, hello: bytes, replies: dict[bytes, bytes], default: bytes = b"+OK\r\n"):
        self.hello, self.replies, self.default = hello, replies, default
        self.commands: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._connections: list[socket.socket] = []
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        stream = connection.makefile("rb")
        try:
            while line := stream.readline():
                arguments = []
                for _ in range(int(line[1:])):
                    size = int(stream.readline()[1:])
                    arguments.append(stream.read(size + 2)[:-2])
                name = arguments[0].upper()
                self.commands.append(name)
                echo = b"$%d\r\n%s\r\n" % (len(arguments[-1]), arguments[-1])  # the one answer every case gets right
                reply = {b"HELLO": self.hello, b"ECHO": echo, **HANDSHAKE}.get(name) or self.replies.get(
                    name, self.default
                )
                connection.sendall(reply.removesuffix(CLOSE))
                if reply.endswith(CLOSE):
                    connection.close()
                    return
        except (OSError, ValueError):
            return

    def close(self) -> None:
        self._listener.close()
        for connection in self._connections:
            connection.close()


def _reads(reply: bytes) -> dict[bytes, bytes]:
    """The same reply to every read command (``MGET``, ``GET``, ``GETRANGE``)."""
    return {b"MGET": reply, b"GET": reply, b"GETRANGE": reply}


GARBAGE = {
    "HELLO answered with an integer": (b":3\r\n", {}),
    "HELLO answered with an array": (b"*1\r\n:3\r\n", {}),
    "HELLO answered with a string": (b"$2\r\nhi\r\n", {}),
    "read answered with an integer": (HELLO, _reads(b":7\r\n")),
    "read answered with a short array": (HELLO, _reads(b"*1\r\n_\r\n")),
    "read answered with a long array": (HELLO, _reads(b"*5\r\n_\r\n_\r\n_\r\n_\r\n_\r\n")),
    "read answered with a map": (HELLO, _reads(b"%1\r\n+a\r\n+b\r\n")),
    "read answered with a double": (HELLO, _reads(b",1.5\r\n")),
    "read answered with a boolean": (HELLO, _reads(b"#t\r\n")),
    "read answered with two replies": (HELLO, _reads(b"_\r\n_\r\n")),
    "read answered with a protocol error": (HELLO, _reads(b"?what\r\n")),
    "read cut mid-reply": (HELLO, _reads(b"$1000\r\nhlc1U" + CLOSE)),
    "writes answered with a map": (HELLO, {**_reads(MISS), b"SET": b"%1\r\n+a\r\n+b\r\n"}),
    "writes cut mid-reply": (HELLO, {**_reads(MISS), b"SET": b"$9\r\nOK" + CLOSE}),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_replies_are_counted_misses_and_never_reach_the_request(case):
    hello, replies = GARBAGE[case]
    fake = FakeRedis(hello, replies)
    kwargs = {"socket_timeout": 5, "connect_timeout": 5}
    model = hf_layercache.enable(tiny_model("bert"), {"shared_store": fake.url, "shared_store_kwargs": kwargs})
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for seed in (1, 2):  # the first request meets the peer; the second finds the breaker open
                batch = tiny_batch("bert", batch=3, length=9, seed=seed)
                assert torch.equal(_run(model, batch), _uncached(model, batch)), case
                assert model.layer_cache.shared.flush(30)  # its writes met the peer too before the next request
        shared = model.layer_cache.stats()["shared"]
        assert shared["shared_hits"] == 0 and shared["shared_errors"] >= 1, (case, shared)
        if case.startswith("writes"):  # the read went well; what was computed was not written
            assert shared["shared_misses"] == 3 and shared["shared_dropped"] >= 1, (case, shared)
        else:  # the second request's lookup was skipped (or failed again): never a hit
            assert shared["shared_skipped"] + shared["shared_errors"] >= 2, (case, shared)
        messages = [str(w.message) for w in caught if "shared store" in str(w.message)]
        assert 1 <= len(messages) <= 3 and len(set(messages)) == len(messages), (case, messages)
    finally:
        model.layer_cache.shared.close()
        fake.close()


# --- against a real redis-server --------------------------------------------------------------------------------
@pytest.mark.parametrize("bound", ["max_memory", "max_value_bytes"])
def test_an_oversized_value_is_a_miss_and_is_not_transferred(server, bound):
    """A 32 MB value planted under the key a request reads: a miss, counted, of which at most the bound (1 MB: the
    bank's share of ``max_memory``, or ``max_value_bytes``) left Redis (its ``total_net_output_bytes``)."""
    limit = 2**20
    if bound == "max_memory":
        config = _config(server, max_memory=2 * limit)  # two banks (the stack's rows, whole outputs): 1 MB each
    else:
        config = _config(server, shared_store_kwargs={"max_value_bytes": limit})
    batch = tiny_batch("bert", batch=1)
    a = hf_layercache.enable(tiny_model("bert"), config)
    _run(a, batch)
    assert a.layer_cache.shared.flush(10)
    client = server.client()
    (key,) = client.keys("*")
    planted = MAGIC + b"U" + bytes(32 * 2**20)
    client.set(key, planted)
    b = hf_layercache.enable(tiny_model("bert"), config)
    before = client.info("stats")["total_net_output_bytes"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(b, batch)
    sent = client.info("stats")["total_net_output_bytes"] - before
    assert torch.equal(out, _uncached(b, batch))
    assert sent < limit + 2**16, sent  # the first MB at most, never the 32 MB
    shared = b.layer_cache.stats()["shared"]
    assert shared["shared_oversized"] == 1 and shared["shared_misses"] == 1 and shared["shared_hits"] == 0
    assert shared["shared_bytes_read"] == limit + 1 and shared["shared_errors"] == 0
    assert any("longer than" in str(w.message) for w in caught)
    assert b.layer_cache.shared.flush(10)
    assert len(client.get(key)) < limit  # b's computed entry replaced the planted value


def test_the_write_queue_holds_at_most_queue_bytes_of_tensors(server):
    """Writes held by ``CLIENT PAUSE WRITE`` (reads go on): the entries queued never hold more than ``queue_bytes``
    (here ``max_memory``, its default) of tensors; the rest are dropped and counted. Nothing can be sent while the
    pause lasts, so every entry written after it was held at once: their bytes are within the bound too."""
    bound = 60_000
    a = hf_layercache.enable(
        tiny_model("bert"), _config(server, max_memory=bound, shared_store_kwargs={"socket_timeout": 600})
    )
    pool = [tiny_batch("bert", batch=1, length=40, seed=seed) for seed in range(2, 22)]  # 5,145 bytes an entry
    client = server.client()
    client.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")
    held = []
    try:
        for batch in pool:
            assert torch.equal(_run(a, batch), _uncached(a, batch))
            held.append(a.layer_cache.shared.client.queued_bytes)
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
    assert a.layer_cache.shared.flush(60)
    written = [decode(client.get(key), key.decode(), None)[0] for key in client.keys("*")]
    written_bytes = sum(t.numel() * t.element_size() for values in written for t in values.values())
    shared = a.layer_cache.stats()["shared"]
    assert shared["shared_errors"] == 0 and shared["shared_misses"] == len(pool)
    assert 0 < written_bytes <= bound, written_bytes
    assert 0 < max(held) <= bound and held == sorted(held), held  # nothing left the queue while paused
    assert shared["shared_dropped"] >= 1 and len(written) + shared["shared_dropped"] == len(pool)
    assert a.layer_cache.shared.client.queued_bytes == 0
