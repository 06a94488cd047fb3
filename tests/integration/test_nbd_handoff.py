"""The NBD server's side of a live engine upgrade (drove.engine.handoff): a connection
frozen at a request boundary, and the listener, go on in another server."""

from __future__ import annotations

import os
import random
import select
import socket
import time

from drove.nbd import proto
from drove.nbd.memory import MemoryExport, MemoryProvider
from nbdtools import RawClient, ServerThread

MiB = 1 << 20
SIZE = 8 * MiB


def server() -> ServerThread:
    """An NBD server of one 8 MiB memory export, on its own loop (uvloop)."""
    return ServerThread(MemoryProvider([MemoryExport(SIZE)]))


def write_header(handle: int, offset: int, length: int) -> bytes:
    """A WRITE request's header."""
    return proto.REQUEST.pack(proto.NBD_REQUEST_MAGIC, 0, proto.NBD_CMD_WRITE, handle, offset,
                              length)


def read_request(handle: int, offset: int, length: int) -> bytes:
    """A READ request."""
    return proto.REQUEST.pack(proto.NBD_REQUEST_MAGIC, 0, proto.NBD_CMD_READ, handle, offset,
                              length)


def data_of(srv: ServerThread) -> bytearray:
    """The bytes of the server's export."""
    return srv.provider.exports[""].data


def wait_until(predicate, what: str, timeout: float = 10) -> None:
    """Poll ``predicate()`` until true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_connection_in_the_middle_of_a_large_write_goes_on_in_another_server() -> None:
    payload = random.Random(5).randbytes(MiB)
    with server() as old, server() as new, RawClient(old.host, old.port) as client:
        client.connect(structured=True)
        client.send(write_header(1, 0, 4096) + b"a" * 4096)
        assert client.reply()[:2] == (1, 0)
        client.send(write_header(2, MiB, MiB) + payload[:100_000])
        # The server has read the header and part of the payload: the write is not started.
        wait_until(lambda: len(old.call(old.server.handoff)[0][1]) == 28 + 100_000,
                   "the server to read the partial write")
        listeners = old.call(old.server.freeze)
        old.call(old.server.drained, 5)
        [(state, pending, fd)] = old.call(old.server.handoff)
        assert pending == write_header(2, MiB, MiB) + payload[:100_000]
        assert state["export"] == "" and state["structured"] and not state["tls"]
        assert new.call(new.server.adoptable, state) is None
        new.call(new.server.adopt_connection, socket.socket(fileno=os.dup(fd)), state, pending)
        for kind, sock in listeners:
            new.call(new.server.adopt_listener, kind, sock)
        old.call(old.server.release)  # its descriptors close: the client sees nothing
        client.send(payload[100_000:] + read_request(3, MiB, MiB))
        assert client.reply()[:2] == (2, 0)
        assert client.reply(MiB) == (3, 0, payload)
        assert data_of(new)[MiB:2 * MiB] == payload
        assert data_of(old)[:4096] == b"a" * 4096 and not any(data_of(old)[MiB:2 * MiB])
        # A client connecting now reaches the new server through the same listener.
        with RawClient(old.host, old.port) as later:
            later.connect()
            later.send(write_header(9, 4 * MiB, 4096) + b"z" * 4096)
            assert later.reply()[:2] == (9, 0)
        assert data_of(new)[4 * MiB:4 * MiB + 4096] == b"z" * 4096


def test_a_handoff_that_does_not_happen_leaves_the_connection_serving() -> None:
    with server() as old, RawClient(old.host, old.port) as client:
        client.connect()
        listeners = old.call(old.server.freeze)
        old.call(old.server.drained, 5)
        client.send(write_header(1, 0, 4096) + b"b" * 4096 + read_request(2, 0, 4096))
        # Frozen: the requests wait, unread (no reply within a generous moment).
        assert select.select([client.sock], [], [], 0.3)[0] == []
        old.call(old.server.thaw, listeners)
        assert client.reply()[:2] == (1, 0)
        assert client.reply(4096) == (2, 0, b"b" * 4096)
        with RawClient(old.host, old.port) as later:
            later.connect()
            later.send(read_request(3, 0, 4096))
            assert later.reply(4096) == (3, 0, b"b" * 4096)


def test_a_connection_state_another_server_cannot_honour_is_named() -> None:
    with server() as srv:
        state = {"export": "", "structured": True, "block_status": False, "tls": False,
                 "extended_headers": False, "tflags": 0, "min_block": 1,
                 "max_block": 32 * MiB, "max_other": 32 * MiB, "skip": 0}
        assert srv.call(srv.server.adoptable, state) is None
        assert "no export 'nope'" in srv.call(srv.server.adoptable, {**state, "export": "nope"})
        assert "TLS" in srv.call(srv.server.adoptable, {**state, "tls": True})
        assert "was told" in srv.call(srv.server.adoptable, {**state, "max_block": 1 << 30})
        assert "flags" in srv.call(srv.server.adoptable, {**state, "tflags": 1 << 15})
