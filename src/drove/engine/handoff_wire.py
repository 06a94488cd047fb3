"""The wire of an engine handoff (drove.engine.handoff): framed JSON, a blob, descriptors.

A frame is two big-endian u32 (the JSON's length, the blob's length), the JSON
object, then the blob (bytes a message refers to by offset: the unparsed bytes
of the client connections).  Descriptors travel beside the bytes (SCM_RIGHTS);
a frame that carries some says how many in its ``"fds"`` member, and the
receiver hands exactly those to it.  Linux passes at most 253 descriptors per
message, so beyond :data:`MAX_FDS_PER_MESSAGE` the sender follows with as many
``{"op": "more-fds"}`` frames carrying the rest as the frame's ``"more"`` says.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import struct
from collections import deque
from typing import Any, NamedTuple

HEADER = struct.Struct(">II")
MAX_JSON = 4 << 20
"""Longest JSON part accepted (thousands of connection states fit)."""
MAX_BLOB = 1 << 30
"""Longest blob accepted (unparsed bytes: at most a partial write per connection)."""
MAX_FDS_PER_MESSAGE = 250
"""Descriptors sent with one sendmsg (Linux's SCM_MAX_FD is 253)."""
_RECV = 1 << 16


class WireError(Exception):
    """The peer sent something that is not a handoff frame (the message says what)."""


class Frame(NamedTuple):
    """One message: its JSON object, its blob and the descriptors it carried."""

    msg: dict[str, Any]
    blob: bytes
    fds: list[int]


def encode(msg: dict[str, Any], blob: bytes = b"") -> bytes:
    """One frame's bytes."""
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_JSON or len(blob) > MAX_BLOB:
        raise WireError(f"frame too large ({len(body)} bytes of JSON, {len(blob)} of blob)")
    return HEADER.pack(len(body), len(blob)) + body + blob


class Decoder:
    """Cuts a byte stream into (message, blob) pairs."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        """Add received bytes; every frame they complete (WireError on a malformed one)."""
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            jlen, blen = HEADER.unpack_from(self._buf)
            if jlen > MAX_JSON or blen > MAX_BLOB:
                raise WireError(f"frame too large ({jlen} bytes of JSON, {blen} of blob)")
            end = HEADER.size + jlen + blen
            if len(self._buf) < end:
                break
            try:
                msg = json.loads(bytes(self._buf[HEADER.size : HEADER.size + jlen]))
            except (UnicodeDecodeError, ValueError) as exc:
                raise WireError(f"a frame is not JSON: {exc}") from None
            if not isinstance(msg, dict):
                raise WireError("a frame is not a JSON object")
            frames.append((msg, bytes(self._buf[HEADER.size + jlen : end])))
            del self._buf[:end]
        return frames


def fds_count(msg: dict[str, Any]) -> int:
    """How many descriptors a message says it carries (WireError unless 0 or more)."""
    n = msg.get("fds", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise WireError(f"bad descriptor count {n!r}")
    return n


class Channel:
    """Frames and descriptors over a connected unix stream socket, on the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._decoder = Decoder()
        self._frames: deque[tuple[dict[str, Any], bytes]] = deque()
        self._fds: list[int] = []  # received, not yet handed to a frame
        self._eof = False

    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd = self.sock.fileno()
        add, remove = ((loop.add_writer, loop.remove_writer) if writable
                       else (loop.add_reader, loop.remove_reader))
        add(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            remove(fd)

    async def send(self, msg: dict[str, Any], blob: bytes = b"", fds: list[int] = ()) -> None:
        """Send one frame with ``fds`` (its ``"fds"`` member is set to their number)."""
        fds = list(fds)
        rest = fds[MAX_FDS_PER_MESSAGE:]
        more = -(-len(rest) // MAX_FDS_PER_MESSAGE)
        await self._send_with(encode({**msg, "fds": len(fds), **({"more": more} if more else {})},
                                     blob), fds[:MAX_FDS_PER_MESSAGE])
        while rest:
            chunk, rest = rest[:MAX_FDS_PER_MESSAGE], rest[MAX_FDS_PER_MESSAGE:]
            await self._send_with(encode({"op": "more-fds", "fds": len(chunk)}), chunk)

    async def _send_with(self, data: bytes, fds: list[int]) -> None:
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while view:
            try:
                n = self.sock.sendmsg([view], anc)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
                continue
            anc = []  # the descriptors went with the first bytes
            view = view[n:]

    def _recv_once(self) -> bool:
        """Read what the socket holds now; False when it holds nothing yet."""
        try:
            data, anc, flags, _ = self.sock.recvmsg(
                _RECV, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return False
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise WireError("descriptors were cut off in transit")
        if not data:
            self._eof = True
        else:
            self._frames.extend(self._decoder.feed(data))
        return True

    async def _next(self) -> tuple[dict[str, Any], bytes]:
        while not self._frames:
            if self._eof:
                raise ConnectionError("the other engine closed the handoff channel")
            if not self._recv_once():
                await self._wait(writable=False)
        return self._frames.popleft()

    async def recv(self, timeout: float) -> Frame:
        """The next frame with its descriptors (TimeoutError, ConnectionError at EOF)."""
        async with asyncio.timeout(timeout):
            msg, blob = await self._next()
            want = fds_count(msg)
            # A frame's descriptors come with its bytes (the kernel may hand them over
            # with the bytes before them): all are here once its last frame is.
            for _ in range(fds_count({"fds": msg.get("more", 0)})):
                more, _ = await self._next()
                if more.get("op") != "more-fds":
                    raise WireError(f"expected a more-fds frame, got {more.get('op')!r}")
        if len(self._fds) < want:
            raise WireError(f"expected {want} descriptors, got {len(self._fds)}")
        fds, self._fds = self._fds[:want], self._fds[want:]
        return Frame(msg, blob, fds)

    def received(self) -> list[dict[str, Any]]:
        """The messages already sent to us, without waiting (after the peer died)."""
        with contextlib.suppress(OSError, WireError):
            while not self._eof and self._recv_once():
                pass
        msgs = [msg for msg, _ in self._frames]
        self._frames.clear()
        return msgs

    def close(self) -> None:
        """Close the socket and every descriptor received and not handed out."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.sock.close()


__all__ = ["Channel", "Decoder", "Frame", "WireError", "encode"]
