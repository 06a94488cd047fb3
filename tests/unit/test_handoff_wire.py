"""The engine handoff's wire (drove.engine.handoff_wire): frames, blobs, descriptors."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

from drove.engine.handoff_wire import (
    HEADER,
    MAX_FDS_PER_MESSAGE,
    Channel,
    Decoder,
    WireError,
    encode,
)


def test_frames_come_out_whole_however_the_bytes_are_cut() -> None:
    frames = [({"op": "hello", "epoch": 7}, b""), ({"op": "handoff"}, b"\x00unparsed\xff" * 3)]
    stream = b"".join(encode(m, b) for m, b in frames)
    assert Decoder().feed(stream) == frames
    decoder, out = Decoder(), []
    for i in range(len(stream)):
        out += decoder.feed(stream[i:i + 1])
    assert out == frames


@pytest.mark.parametrize("raw, why", [
    (HEADER.pack(3, 0) + b"{x}", "not JSON"),
    (HEADER.pack(2, 0) + b"[]", "not a JSON object"),
    (HEADER.pack(1 << 30, 0), "too large"),
    (HEADER.pack(2, 1 << 31) + b"{}", "too large"),
])
def test_a_malformed_frame_is_refused(raw: bytes, why: str) -> None:
    with pytest.raises(WireError, match=why):
        Decoder().feed(raw)


def _pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(a), Channel(b)


@pytest.mark.parametrize("count", [1, MAX_FDS_PER_MESSAGE + 50])
def test_descriptors_arrive_with_their_frame_and_work(count: int) -> None:
    """Each received descriptor is the pipe that was sent: what is written to it comes out
    of the sender's end; beyond one message's limit they follow in more frames."""
    pipes = [os.pipe() for _ in range(count)]

    async def go() -> None:
        left, right = _pair()
        try:
            blob = os.urandom(300_000)  # more than one socket buffer: sent in pieces
            frame, _ = await asyncio.gather(
                right.recv(10), left.send({"op": "handoff"}, blob, [w for _, w in pipes]))
            await left.send({"op": "committed"})
            assert (await right.recv(10)).msg == {"op": "committed", "fds": 0}
        finally:
            left.close()
            right.close()
        assert frame.msg["op"] == "handoff" and frame.msg["fds"] == count
        assert frame.blob == blob
        assert len(frame.fds) == count
        for (r, _), fd in zip(pipes, frame.fds, strict=True):
            os.write(fd, b"x")
            os.close(fd)
            assert os.read(r, 1) == b"x"

    try:
        asyncio.run(go())
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_the_peer_going_away_is_a_connection_error_and_keeps_what_it_said() -> None:
    async def go() -> None:
        left, right = _pair()
        await left.send({"op": "claiming"})
        left.close()
        assert await right.recv(5) == ({"op": "claiming", "fds": 0}, b"", [])
        with pytest.raises(ConnectionError):
            await right.recv(5)
        right.close()

    asyncio.run(go())


def test_messages_already_sent_are_read_without_waiting() -> None:
    async def go() -> None:
        left, right = _pair()
        assert right.received() == []
        await left.send({"op": "claiming"})
        await left.send({"op": "abort", "error": "no"})
        left.close()
        assert [m["op"] for m in right.received()] == ["claiming", "abort"]
        right.close()

    asyncio.run(go())


def test_a_silent_peer_times_out() -> None:
    async def go() -> None:
        left, right = _pair()
        with pytest.raises(TimeoutError):
            await right.recv(0.05)
        left.close()
        right.close()

    asyncio.run(go())


def test_garbage_from_the_peer_is_a_wire_error() -> None:
    async def go() -> None:
        left, right = _pair()
        left.sock.send(HEADER.pack(3, 0) + json.dumps("x").encode())
        with pytest.raises(WireError):
            await right.recv(5)
        left.close()
        right.close()

    asyncio.run(go())
