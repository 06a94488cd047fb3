"""Pipelined asyncio NBD client: fixed newstyle handshake, many requests in flight.

The engine talks to every replica through this client, so it sits on the hot
path of every guest I/O.  The design mirrors the server (drove.nbd.server):

* One :class:`asyncio.BufferedProtocol` per connection.  Reply headers and
  small payloads are read into a reusable receive buffer and parsed with
  precompiled ``struct.Struct`` formats (``unpack_from``, no slicing); the
  payload of a large read is received by the kernel straight into the
  caller's buffer (``get_buffer`` returns a view of the destination).
* No Task per request: a request is a small record with a Future, kept in a
  dict keyed by its 64-bit cookie (a counter) and resolved from the protocol
  when its reply arrives.  Replies may come in any order.
* A write's header and payload go out with one ``transport.writelines`` (no
  concatenation copy; uvloop sends both with a single writev).  When the
  transport's write buffer is full (``pause_writing``) new requests wait.
* Reads and writes larger than the maximum block size are split into pieces
  that are in flight together.
* With ``request_timeout`` one watchdog timer (not a timer per request) checks
  the age of the oldest outstanding request; when it is too old, the
  connection is aborted and every outstanding request fails with
  :class:`NbdTimeoutError`.

Errors: ``connect_*`` raise :class:`OSError` when the server cannot be reached
(``ConnectionRefusedError``, ``FileNotFoundError``, ...), :class:`NbdTimeoutError`
when ``connect_timeout`` passed, and :class:`NbdHandshakeError` when the
server refused or botched the negotiation.  A command the server failed raises
:class:`NbdCommandError` (an ``OSError`` with the POSIX errno); a lost,
aborted or timed-out connection raises :class:`NbdConnectionError` for every
outstanding and every later request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

from drove.nbd import eager, proto
from drove.nbd.arena import MIN_SIZE as _ARENA_MIN
from drove.nbd.arena import PeerProcess
from drove.nbd.export import Extent

__all__ = [
    "NbdClient",
    "NbdClientError",
    "NbdCommandError",
    "NbdConnectionError",
    "NbdHandshakeError",
    "NbdTimeoutError",
    "NbdUri",
    "connect_tcp",
    "connect_unix",
    "connect_uri",
    "extents",
    "parse_uri",
    "tls_context_from_dir",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809

# --- Wire formats not in proto.py -------------------------------------------

_U64 = struct.Struct(">Q")
"""A big-endian u64, 8 bytes (OFFSET_DATA's offset, ERROR_OFFSET's trailing offset)."""

_U32 = proto.U32
_REQUEST = proto.REQUEST  # 28 bytes: u32 magic, u16 flags, u16 type, u64 cookie, u64 off, u32 len
_SIMPLE = proto.SIMPLE_REPLY  # 16 bytes: u32 magic, u32 error, u64 cookie
_CHUNK = proto.STRUCTURED_REPLY  # 20 bytes: u32 magic, u16 flags, u16 type, u64 cookie, u32 len
_OFFSET_HOLE = proto.OFFSET_HOLE  # 12 bytes: u64 offset, u32 hole size
_ERROR_PAYLOAD = proto.ERROR_PAYLOAD  # 6 bytes: u32 error, u16 message length
_DESCRIPTOR = proto.BLOCK_DESCRIPTOR  # 8 bytes: u32 extent length, u32 status flags

_DATA_CHUNK = proto.OFFSET_DATA_CHUNK  # 28 bytes: the chunk header plus OFFSET_DATA's u64 offset

_SIMPLE_MAGIC = proto.NBD_SIMPLE_REPLY_MAGIC
_STRUCTURED_MAGIC = proto.NBD_STRUCTURED_REPLY_MAGIC
_SIMPLE_FIRST = _SIMPLE_MAGIC >> 24  # 0x67: first byte on the wire
_STRUCTURED_FIRST = _STRUCTURED_MAGIC >> 24  # 0x66
_REQUEST_MAGIC = proto.NBD_REQUEST_MAGIC
_DONE = proto.NBD_REPLY_FLAG_DONE

_CMD_READ = proto.NBD_CMD_READ
_CMD_WRITE = proto.NBD_CMD_WRITE
_CMD_BLOCK_STATUS = proto.NBD_CMD_BLOCK_STATUS
_CMD_WRITE_ARENA = proto.NBD_CMD_DROVE_WRITE_ARENA
_CMD_READ_ARENA = proto.NBD_CMD_DROVE_READ_ARENA
# Command names for messages, drove's private arena commands included.
_NAMES = {**proto.COMMAND_NAMES, _CMD_WRITE_ARENA: "WRITE", _CMD_READ_ARENA: "READ"}

# --- Tuning -----------------------------------------------------------------------

_RBUF_SIZE = 256 * 1024  # receive buffer for reply headers and small payloads
_CORK_LIMIT = 256 * 1024  # send a batch of queued requests early beyond this many payload bytes
# Send queued requests early once this many are waiting: the replica starts on the
# first ones while the engine still parses the rest of its client's batch.  Waiting
# for the whole batch left both processes idle in turn (measured: 20-35% of both
# CPUs idle at queue depth 16, against ~15% when sending every 8).
_CORK_COUNT = 8
# At most this much of the receive buffer is offered to one recv: small
# replies still arrive in batches, while the first part of a large read
# payload that lands here (and must be copied) stays small.
_RECV_WINDOW = 64 * 1024
_MIN_FREE = 16 * 1024  # compact the receive buffer when less room than this is left
# A payload remainder at least this large is received straight into the
# destination; a smaller one is read into the receive buffer together with
# the replies behind it and copied (one memcpy is cheaper than one recv).
_DIRECT_MIN = 32 * 1024
_MAX_CHUNK = 64 * 1024 * 1024  # longest non-data structured chunk accepted
_MAX_OPTION_REPLY = 1024 * 1024  # longest option reply accepted during the handshake
_MAX_PIECE = proto.NBD_DOS_THRESHOLD  # reads/writes are split at min(max_block, 32 MiB)
_BIG_PIECE = 1 << 31  # TRIM, fast WRITE_ZEROES: no block size limit, but a u32 length
_PIECE_WINDOW = 32  # pieces of one split call in flight at once
_WRITE_HIGH_WATER = 4 * 1024 * 1024  # queued request bytes before new requests wait
_SOCKET_SNDBUF = 4 * 1024 * 1024
_CLOSE_TIMEOUT = 5.0  # how long close() waits for the server to hang up after DISC
_ZEROS = bytes(1024 * 1024)  # source for filling OFFSET_HOLE ranges

_HANDSHAKE = 0
_TRANSMISSION = 1
_CLOSED = 2

_REP_ERR_NAMES = {
    value: name.removeprefix("NBD_REP_")
    for name, value in vars(proto).items()
    if name.startswith("NBD_REP_ERR_") and isinstance(value, int)
}
_NBD_ERRNAMES = {
    proto.NBD_EPERM: "EPERM",
    proto.NBD_EIO: "EIO",
    proto.NBD_ENOMEM: "ENOMEM",
    proto.NBD_EINVAL: "EINVAL",
    proto.NBD_ENOSPC: "ENOSPC",
    proto.NBD_EOVERFLOW: "EOVERFLOW",
    proto.NBD_ENOTSUP: "ENOTSUP",
    proto.NBD_ESHUTDOWN: "ESHUTDOWN",
}


# --- Exceptions -------------------------------------------------------------------


class NbdClientError(Exception):
    """Base class of handshake problems (the connection could not be set up)."""


class NbdHandshakeError(NbdClientError):
    """The negotiation failed: export missing, option refused, TLS required, bad reply."""


class NbdCommandError(OSError):
    """A command failed on the server; ``errno`` is the POSIX errno of the NBD error."""

    def __init__(
        self,
        err: int,
        message: str,
        *,
        nbd_error: int = 0,
        command: str = "",
        offset: int | None = None,
        server_message: str = "",
        error_offset: int | None = None,
    ) -> None:
        """Build from the local ``err`` (errno) and a human-readable ``message``."""
        super().__init__(err, message)
        self.nbd_error = nbd_error
        self.command = command
        self.offset = offset
        self.server_message = server_message
        self.error_offset = error_offset  # from NBD_REPLY_TYPE_ERROR_OFFSET


class NbdConnectionError(ConnectionError):
    """The connection is gone (EOF, reset, protocol violation, aborted, closed)."""


class NbdTimeoutError(NbdConnectionError, TimeoutError):
    """A request was not answered within ``request_timeout``; the connection was aborted."""


def _command_error(
    cmd: int, offset: int, length: int, nbd_err: int, message: str = "",
    error_offset: int | None = None,
) -> NbdCommandError:
    """The exception for NBD error ``nbd_err`` returned to a request."""
    err = proto.errno_of(nbd_err)
    name = _NAMES.get(cmd, str(cmd))
    where = "" if cmd == proto.NBD_CMD_FLUSH else f" at offset {offset} length {length}"
    text = f"{os.strerror(err)} ({name}{where} failed with {_NBD_ERRNAMES.get(nbd_err, nbd_err)})"
    if message:
        text += f": {message}"
    return NbdCommandError(
        err, text, nbd_error=nbd_err, command=name, offset=offset,
        server_message=message, error_offset=error_offset,
    )


def _local_error(err: int, cmd: int, text: str) -> NbdCommandError:
    """A request refused before it was sent (unsupported, impossible argument)."""
    name = _NAMES.get(cmd, str(cmd))
    return NbdCommandError(err, f"{os.strerror(err)} ({name}: {text})", command=name)


# --- Requests ---------------------------------------------------------------------


class _Request:
    """One outstanding request: its Future, what it was, and its reply state."""

    __slots__ = ("buf", "cmd", "data", "error", "extents", "fut", "got", "hdr", "length", "offset")

    def __init__(
        self, fut: asyncio.Future[Any], cmd: int, offset: int, length: int,
        buf: memoryview | None,
    ) -> None:
        self.fut = fut
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.buf = buf  # READ: where the payload goes (None once the caller gave up)
        self.got = 0  # READ with structured replies: bytes covered by data/hole chunks
        self.error: BaseException | None = None  # first error chunk of a structured reply
        self.extents: list[Extent] | None = None  # BLOCK_STATUS result
        self.hdr: bytes | None = None  # set while waiting to be sent (flow control)
        self.data: Any = None  # WRITE payload while waiting to be sent


class _Callback:
    """Stands in for a request's Future when the caller submitted it with a callback.

    Success calls ``done`` at once, from inside the reply parser: the reply to
    the engine's own client is built in the same turn, with no Task or loop
    trip.  Errors are passed on from a fresh loop turn instead, because error
    handling may close this very connection while its parser is running.
    """

    __slots__ = ("_done", "_fn", "_loop", "_value")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: eager.Done, value: Any) -> None:
        self._loop = loop
        self._fn = fn
        self._value = value  # what success hands on (a READ's buffer)
        self._done = False

    def done(self) -> bool:
        """Whether the outcome was delivered (Future interface)."""
        return self._done

    def set_result(self, result: Any) -> None:
        """Success: call back now."""
        self._done = True
        try:
            self._fn(self._value if result is None else result, None)
        except Exception:
            log.exception("NBD client: completion callback failed")

    def set_exception(self, exc: BaseException) -> None:
        """Failure: call back from the next loop turn."""
        self._done = True
        self._loop.call_soon(self._fn, None, exc)

    def cancel(self) -> bool:
        """The request is abandoned: report it cancelled."""
        if self._done:
            return False
        self.set_exception(asyncio.CancelledError())
        return True


class _ArenaCallback(_Callback):
    """A read into an arena slot: success hands the slot on to the caller.

    On an error reply the server is done with the slot, which is given back.
    On a lost connection or a timeout the server may still be running the
    request and write into the slot later, so the slot is retired until the
    server's process (``writer``, a :class:`drove.nbd.arena.PeerProcess`) exited.
    """

    __slots__ = ("_arena", "_writer")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: eager.Done, value: Any,
                 arena: Any, writer: PeerProcess | None) -> None:
        super().__init__(loop, fn, value)
        self._arena = arena
        self._writer = writer

    def set_exception(self, exc: BaseException) -> None:
        """Failure: free or retire the slot, then call back from the next loop turn."""
        if isinstance(exc, NbdCommandError):
            self._arena.give_back(self._value)
        else:
            self._arena.retire(self._value, self._writer)
        super().set_exception(exc)


# --- The protocol -------------------------------------------------------------------


class _Connection(asyncio.BufferedProtocol):
    """One NBD connection: handshake coroutine, then the reply parser."""

    def __init__(self, loop: asyncio.AbstractEventLoop, where: str) -> None:
        """Create the protocol; ``where`` names the server in messages."""
        self._loop = loop
        self.where = where
        self._transport: asyncio.Transport | None = None
        self.phase = _HANDSHAKE
        self.reason = ""  # why the connection is closed: a sentence naming the server
        self.lost = loop.create_future()  # resolved by connection_lost
        self.closing = False  # close() started: no new requests

        # Handshake: bytes accumulate in _hbuf, a coroutine waits for them.
        self._hview = memoryview(bytearray(64 * 1024))
        self._hbuf = bytearray()
        self._hwaiter: asyncio.Future[None] | None = None
        self._heof = False

        # Negotiated state.
        self.tls = False
        self.structured = False
        self.meta_id: int | None = None  # context id of base:allocation
        self.size = 0
        self.flags = 0
        self.min_block = proto.NBD_DEFAULT_MIN_BLOCK
        self.preferred_block = proto.NBD_DEFAULT_PREFERRED_BLOCK
        self.max_block = proto.NBD_DOS_THRESHOLD
        self.description = ""
        self.piece = _MAX_PIECE  # split reads and writes at this size
        self.arena: Any = None  # the drove.nbd.arena.Arena the server accepted, if any
        self.arena_writer: PeerProcess | None = None  # the server's process, which maps it

        # Requests.
        self.pending: dict[int, _Request] = {}
        self._cookie = 0
        self.write_paused = False
        # Requests issued in one turn of the event loop leave in one writev: every
        # write to a socket whose reader sleeps wakes it (on a VM, a cross-CPU
        # interrupt), and a mirror issues its writes to a replica in bursts.
        self._out: list[Any] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle_waiter: asyncio.Future[None] | None = None

        # Receive state.  Unparsed bytes are _rbuf[_rstart:_rend]; _need is
        # how many bytes from _rstart the parser waits for (a whole chunk).
        self._rbuf = bytearray(_RBUF_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0
        self._rend = 0
        self._need = 0
        self._discard: memoryview | None = None  # payloads nobody wants (made when needed)
        # Payload in progress: _plen bytes for _preq at _prel in its buffer,
        # _ppos of them received; _pdone: the request completes afterwards.
        self._plen = 0
        self._ppos = 0
        self._prel = 0
        self._preq: _Request | None = None
        self._pcookie = 0
        self._pdone = False
        self._direct = False  # the last get_buffer returned a view of the destination

        # Watchdog.
        self._timeout: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        # (time, last cookie issued at that time), one per tick.
        self._marks: collections.deque[tuple[float, int]] = collections.deque(maxlen=8)

    # ------------------------------------------------------------------
    # Transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Set socket options; the handshake is driven by :meth:`handshake`."""
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    # Requests are small and latency bound: never wait for Nagle.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Room for a few large writes in the kernel, so a 1 MiB write
                # usually goes out in one send instead of via the transport's buffer.
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < _SOCKET_SNDBUF:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_SNDBUF)
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail everything outstanding; later requests fail at once."""
        if self.phase != _CLOSED:
            detail = str(exc) if exc else "server closed the connection"
            self._lose(NbdConnectionError, f"connection to {self.where} lost: {detail}")
        self._heof = True
        self._wake_handshake()
        if not self.lost.done():
            self.lost.set_result(None)

    def eof_received(self) -> bool | None:
        """The server hung up: let the transport close (connection_lost follows)."""
        self._heof = True
        self._wake_handshake()
        return None

    def pause_writing(self) -> None:
        """The transport's buffer is full: new requests wait."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """The buffer drained: let waiting requests go."""
        self.write_paused = False
        self._wake_writers()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the transport puts the next bytes: a payload's destination or _rbuf."""
        if self._plen:
            remaining = self._plen - self._ppos
            if remaining >= _DIRECT_MIN:
                self._direct = True
                dest = self._preq.buf  # type: ignore[union-attr]
                if dest is None:  # the caller was cancelled: drop the payload
                    discard = self._discard_view()
                    return discard[: min(remaining, len(discard))]
                start = self._prel + self._ppos
                return dest[start : start + remaining]
        if self.phase != _TRANSMISSION:
            return self._hview if self.phase == _HANDSHAKE else self._discard_view()
        rend = self._rend
        if len(self._rbuf) - rend < _MIN_FREE or self._need > len(self._rbuf) - self._rstart:
            self._make_room()
            rend = self._rend
        return self._rview[rend : rend + max(_RECV_WINDOW, self._need)]

    def _discard_view(self) -> memoryview:
        if self._discard is None:
            self._discard = memoryview(bytearray(_RBUF_SIZE))
        return self._discard

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` arrived in the buffer of the last :meth:`get_buffer`."""
        if self._direct:
            self._direct = False
            self._ppos += nbytes
            if self._ppos == self._plen:
                # Nothing else is buffered: _rbuf was drained before going direct.
                self._end_payload()
            return
        phase = self.phase
        if phase == _TRANSMISSION:
            self._rend += nbytes
            self._parse()
        elif phase == _HANDSHAKE:
            self._hbuf += self._hview[:nbytes]
            self._wake_handshake()

    # ------------------------------------------------------------------
    # Handshake

    def _wake_handshake(self) -> None:
        waiter = self._hwaiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _read(self, n: int) -> bytes:
        """Read exactly ``n`` handshake bytes."""
        while len(self._hbuf) < n:
            if self._heof:
                raise NbdHandshakeError(f"{self.where} closed the connection during the handshake")
            self._hwaiter = self._loop.create_future()
            try:
                await self._hwaiter
            finally:
                self._hwaiter = None
        data = bytes(self._hbuf[:n])
        del self._hbuf[:n]
        return data

    def _send_option(self, option: int, data: bytes = b"") -> None:
        assert self._transport is not None
        self._transport.write(proto.OPTION_HEADER.pack(proto.IHAVEOPT, option, len(data)) + data)

    async def _option_reply(self, option: int) -> tuple[int, bytes]:
        """Read one option reply to ``option``: (reply type, data)."""
        magic, opt, reply, length = proto.OPTION_REPLY.unpack(await self._read(20))
        name = proto.OPTION_NAMES.get(option, str(option))
        if magic != proto.NBD_OPTS_REPLY_MAGIC:
            raise NbdHandshakeError(f"bad option reply magic {magic:#x} from {self.where}")
        if opt != option:
            raise NbdHandshakeError(f"{self.where} answered option {opt} to NBD_OPT_{name}")
        if length > _MAX_OPTION_REPLY:
            raise NbdHandshakeError(f"{self.where} sent a {length} byte reply to NBD_OPT_{name}")
        return reply, await self._read(length) if length else b""

    def _refusal(self, option: int, reply: int, data: bytes) -> str:
        """Describe an error reply: 'NBD_OPT_X refused (ERR_Y: message)'."""
        name = proto.OPTION_NAMES.get(option, str(option))
        err = _REP_ERR_NAMES.get(reply, f"{reply:#x}")
        text = data[: proto.NBD_MAX_STRING].decode("utf-8", "replace")
        return f"NBD_OPT_{name} refused by {self.where} ({err}{': ' + text if text else ''})"

    def _tls_required(self, reply: int) -> None:
        if reply == proto.NBD_REP_ERR_TLS_REQD:
            raise NbdHandshakeError(f"{self.where} requires TLS (pass tls= or use nbds://)")

    async def handshake(
        self, export: str, tls: ssl.SSLContext | None, server_hostname: str | None,
        block_status: bool, arena: Any = None,
    ) -> None:
        """Negotiate: greeting, STARTTLS, structured replies, base:allocation, GO."""
        magic, opt_magic, hflags = proto.NEWSTYLE_GREETING.unpack(await self._read(18))
        if magic != proto.NBDMAGIC:
            raise NbdHandshakeError(f"{self.where} is not an NBD server (magic {magic:#x})")
        if opt_magic == proto.CLISERV_MAGIC:
            raise NbdHandshakeError(f"{self.where} speaks oldstyle NBD, which is unsupported")
        if opt_magic != proto.IHAVEOPT:
            raise NbdHandshakeError(f"bad newstyle magic {opt_magic:#x} from {self.where}")
        fixed = bool(hflags & proto.NBD_FLAG_FIXED_NEWSTYLE)
        no_zeroes = bool(hflags & proto.NBD_FLAG_NO_ZEROES)
        cflags = (proto.NBD_FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (
            proto.NBD_FLAG_C_NO_ZEROES if no_zeroes else 0
        )
        assert self._transport is not None
        self._transport.write(proto.CLIENT_FLAGS.pack(cflags))
        name = export.encode("utf-8")
        if len(name) > proto.NBD_MAX_STRING:
            raise NbdHandshakeError(f"export name longer than {proto.NBD_MAX_STRING} bytes")
        if not fixed:
            # Plain newstyle knows only EXPORT_NAME: no TLS, no structured replies.
            if tls is not None:
                raise NbdHandshakeError(f"{self.where} cannot do TLS (no fixed newstyle)")
            await self._export_name(export, name, no_zeroes)
            return
        if tls is not None:
            await self._starttls(tls, server_hostname)

        self._send_option(proto.NBD_OPT_STRUCTURED_REPLY)
        reply, data = await self._option_reply(proto.NBD_OPT_STRUCTURED_REPLY)
        self._tls_required(reply)
        if reply == proto.NBD_REP_ACK:
            self.structured = True
        elif not reply & proto.NBD_REP_FLAG_ERROR:
            raise NbdHandshakeError(f"unexpected reply {reply} to NBD_OPT_STRUCTURED_REPLY")

        if self.structured and block_status:
            await self._set_meta_context(name)

        if arena is not None and tls is None:
            # Offer our arena (drove.nbd.arena); any server but a drove replica refuses.
            self._send_option(proto.NBD_OPT_DROVE_ARENA, arena.path.encode())
            reply, data = await self._option_reply(proto.NBD_OPT_DROVE_ARENA)
            if reply == proto.NBD_REP_ACK:
                self.arena = arena
                self.arena_writer = PeerProcess.of(self._transport.get_extra_info("socket"))
            else:
                log.debug("%s", self._refusal(proto.NBD_OPT_DROVE_ARENA, reply, data))

        request = _U32.pack(len(name)) + name + proto.U16.pack(1)
        request += proto.U16.pack(proto.NBD_INFO_BLOCK_SIZE)
        self._send_option(proto.NBD_OPT_GO, request)
        have_export = False
        while True:
            reply, data = await self._option_reply(proto.NBD_OPT_GO)
            if reply == proto.NBD_REP_ACK:
                break
            if reply == proto.NBD_REP_INFO:
                have_export |= self._info(data)
                continue
            if reply == proto.NBD_REP_ERR_UNSUP:
                # An old server without GO: the option-less EXPORT_NAME still works.
                await self._export_name(export, name, no_zeroes)
                return
            self._tls_required(reply)
            if reply == proto.NBD_REP_ERR_UNKNOWN:
                raise NbdHandshakeError(f"export {export!r} not found on {self.where}")
            if reply & proto.NBD_REP_FLAG_ERROR:
                raise NbdHandshakeError(self._refusal(proto.NBD_OPT_GO, reply, data))
            # Unknown non-error replies are ignored (the spec allows new ones).
        if not have_export:
            raise NbdHandshakeError(f"{self.where} acknowledged GO without NBD_INFO_EXPORT")

    async def _set_meta_context(self, name: bytes) -> None:
        query = proto.BASE_ALLOCATION.encode()
        data = _U32.pack(len(name)) + name + _U32.pack(1) + _U32.pack(len(query)) + query
        self._send_option(proto.NBD_OPT_SET_META_CONTEXT, data)
        while True:
            reply, data = await self._option_reply(proto.NBD_OPT_SET_META_CONTEXT)
            if reply == proto.NBD_REP_ACK:
                return
            if reply == proto.NBD_REP_META_CONTEXT:
                if len(data) < 4:
                    raise NbdHandshakeError(f"short NBD_REP_META_CONTEXT from {self.where}")
                if data[4:] == query:
                    (self.meta_id,) = _U32.unpack_from(data)
                continue
            self._tls_required(reply)
            if reply & proto.NBD_REP_FLAG_ERROR:
                # No block status then; a missing export is reported by GO.
                log.debug("%s", self._refusal(proto.NBD_OPT_SET_META_CONTEXT, reply, data))
                self.meta_id = None
                return

    def _info(self, data: bytes) -> bool:
        """Record one NBD_REP_INFO; True if it was NBD_INFO_EXPORT."""
        if len(data) < 2:
            raise NbdHandshakeError(f"empty NBD_REP_INFO from {self.where}")
        (info,) = proto.INFO_TYPE.unpack_from(data)
        if info == proto.NBD_INFO_EXPORT:
            if len(data) != proto.INFO_EXPORT.size:
                raise NbdHandshakeError(f"bad NBD_INFO_EXPORT length {len(data)}")
            _, self.size, flags = proto.INFO_EXPORT.unpack(data)
            self._set_flags(flags)
            return True
        if info == proto.NBD_INFO_BLOCK_SIZE:
            if len(data) != proto.INFO_BLOCK_SIZE.size:
                raise NbdHandshakeError(f"bad NBD_INFO_BLOCK_SIZE length {len(data)}")
            _, minimum, preferred, maximum = proto.INFO_BLOCK_SIZE.unpack(data)
            if _valid_block_sizes(minimum, preferred, maximum):
                self.min_block, self.preferred_block, self.max_block = minimum, preferred, maximum
                self.piece = min(maximum, _MAX_PIECE)
            else:  # keep the defaults rather than refuse the server
                log.warning("%s advertised invalid block sizes %d/%d/%d, ignored",
                            self.where, minimum, preferred, maximum)
        elif info == proto.NBD_INFO_DESCRIPTION:
            self.description = data[2:].decode("utf-8", "replace")
        return False

    def _set_flags(self, flags: int) -> None:
        # Without NBD_FLAG_HAS_FLAGS the other bits mean nothing.
        self.flags = flags if flags & proto.NBD_FLAG_HAS_FLAGS else 0

    async def _export_name(self, export: str, name: bytes, no_zeroes: bool) -> None:
        """The old way in: NBD_OPT_EXPORT_NAME; the server hangs up if it has no such export."""
        self._send_option(proto.NBD_OPT_EXPORT_NAME, name)
        try:
            reply = await self._read(proto.EXPORT_NAME_REPLY.size)
            if not no_zeroes:
                await self._read(len(proto.EXPORT_NAME_PADDING))
        except NbdHandshakeError:
            raise NbdHandshakeError(
                f"export {export!r} not found on {self.where} (or refused)"
            ) from None
        self.size, flags = proto.EXPORT_NAME_REPLY.unpack(reply)
        self._set_flags(flags)

    async def _starttls(self, ctx: ssl.SSLContext, server_hostname: str | None) -> None:
        self._send_option(proto.NBD_OPT_STARTTLS)
        reply, data = await self._option_reply(proto.NBD_OPT_STARTTLS)
        if reply != proto.NBD_REP_ACK:
            raise NbdHandshakeError(self._refusal(proto.NBD_OPT_STARTTLS, reply, data))
        if self._hbuf:
            raise NbdHandshakeError(f"{self.where} sent data after acknowledging STARTTLS")
        transport = self._transport
        assert transport is not None
        try:
            new = await self._loop.start_tls(
                transport, self, ctx, server_hostname=server_hostname
            )
        except (ssl.SSLError, ValueError, ConnectionError) as exc:
            raise NbdHandshakeError(f"TLS handshake with {self.where} failed: {exc}") from exc
        if new is None:
            raise NbdHandshakeError(f"{self.where} closed the connection during the TLS handshake")
        self._transport = new
        new.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.tls = True

    def start_transmission(self, request_timeout: float | None) -> None:
        """Switch to the reply parser (and start the watchdog)."""
        self.phase = _TRANSMISSION
        leftover = bytes(self._hbuf)
        self._hbuf = bytearray()
        self._hview = memoryview(b"")  # the handshake buffer is not needed any more
        if request_timeout is not None:
            self._timeout = request_timeout
            self._marks.append((self._loop.time(), self._cookie))
            self._timer = self._loop.call_later(request_timeout / 4, self._watch)
        if leftover:
            # The server answered before being asked: the parser reports it.
            self._rbuf[: len(leftover)] = leftover
            self._rend = len(leftover)
            self._parse()

    def abort_handshake(self) -> None:
        """Drop a connection whose handshake failed."""
        self.phase = _CLOSED
        self.reason = f"handshake with {self.where} failed"
        if self._transport is not None:
            self._transport.abort()

    # ------------------------------------------------------------------
    # Sending requests

    def closed_error(self) -> NbdConnectionError:
        """The exception for a request on a connection that is no longer usable."""
        if self.phase == _CLOSED:
            return NbdConnectionError(f"connection is closed: {self.reason}")
        return NbdConnectionError(f"connection to {self.where} is closing")

    def start(
        self, cmd: int, flags: int, offset: int, length: int, data: Any = None,
        buf: memoryview | None = None, fut: Any = None,
    ) -> _Request:
        """Register and send one request; with the transport paused it is only registered.

        A request left unsent has ``hdr`` set; :meth:`send_later` sends it.
        Registering first makes a request waiting on flow control count for
        the watchdog and fail on connection loss like any other.  ``fut`` is
        what the reply resolves: a new Future unless a :class:`_Callback` is given.
        """
        if self.phase != _TRANSMISSION or self.closing:
            raise self.closed_error()
        cookie = self._cookie + 1
        try:
            hdr = _REQUEST.pack(_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        except struct.error:  # a negative or too large offset cannot even be sent
            raise _local_error(errno.EINVAL, cmd, f"bad range {offset}+{length}") from None
        self._cookie = cookie
        req = _Request(fut or self._loop.create_future(), cmd, offset, length, buf)
        self.pending[cookie] = req
        if self.write_paused:
            req.hdr = hdr
            req.data = data
            return req
        out = self._out
        out.append(hdr)
        if data is not None:
            # uvloop sends the batch with one writev and no copy (the default loop
            # of Python 3.11 joins the pieces first).
            out.append(data)
            self._out_bytes += len(data)  # an arena request's is its 8-byte offset
            if self._out_bytes >= _CORK_LIMIT:
                self.flush_out()
                return req
        if len(out) >= _CORK_COUNT:
            self.flush_out()
            return req
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush_out)
        return req

    def flush_out(self) -> None:
        """Send the requests queued in this turn of the event loop."""
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        self._out = []
        self._out_bytes = 0
        if self.phase == _TRANSMISSION and self._transport is not None:
            self._transport.writelines(out)

    async def send_later(self, req: _Request) -> None:
        """Wait until the transport accepts more, then send ``req`` (if still wanted)."""
        try:
            while self.write_paused and self.phase == _TRANSMISSION:
                waiter = self._loop.create_future()
                self._drain_waiters.append(waiter)
                await waiter
        except asyncio.CancelledError:
            # Never sent: forget it (its cookie is not reused).
            for cookie, other in self.pending.items():
                if other is req:
                    del self.pending[cookie]
                    break
            req.fut.cancel()
            self._check_idle()
            raise
        hdr, data = req.hdr, req.data
        req.hdr = req.data = None
        if self.phase != _TRANSMISSION or req.fut.done():
            return  # the connection was lost meanwhile: req.fut holds the error
        if data is None:
            self._transport.write(hdr)  # type: ignore[union-attr, arg-type]
        else:
            self._transport.writelines((hdr, data))  # type: ignore[union-attr, arg-type]

    def _wake_writers(self) -> None:
        waiters = self._drain_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def send_disc(self) -> None:
        """Send NBD_CMD_DISC (it has no reply)."""
        self.flush_out()
        self._cookie += 1
        self._transport.write(  # type: ignore[union-attr]
            _REQUEST.pack(_REQUEST_MAGIC, 0, proto.NBD_CMD_DISC, self._cookie, 0, 0)
        )

    async def wait_idle(self) -> None:
        """Wait until no request is outstanding (or the connection is gone)."""
        while self.pending and self.phase == _TRANSMISSION:
            self._idle_waiter = self._loop.create_future()
            try:
                await self._idle_waiter
            finally:
                self._idle_waiter = None

    def _check_idle(self) -> None:
        waiter = self._idle_waiter
        if waiter is not None and not self.pending and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------
    # Receiving replies

    def _make_room(self) -> None:
        """Room at the end of the receive buffer, keeping the unparsed bytes."""
        start = self._rstart
        pending = self._rend - start
        size = max(_RBUF_SIZE, self._need + _MIN_FREE)
        if pending > start or size > len(self._rbuf) or (
            len(self._rbuf) > _RBUF_SIZE and size == _RBUF_SIZE
        ):
            # A new buffer: growing for a big chunk, shrinking after one, or a
            # move between overlapping ranges (which CPython would memcpy).
            buf = bytearray(size)
            buf[:pending] = self._rview[start : self._rend]
            self._rbuf = buf
            self._rview = memoryview(buf)
        else:
            self._rbuf[:pending] = self._rview[start : self._rend]
        self._rstart = 0
        self._rend = pending

    def _parse(self) -> None:
        """Handle every complete reply (or chunk) in the receive buffer."""
        buf = self._rview
        pos = self._rstart
        end = self._rend
        self._need = 0
        if self._plen:
            # A small payload remainder arrived in the receive buffer.
            take = min(self._plen - self._ppos, end - pos)
            dest = self._preq.buf  # type: ignore[union-attr]
            if dest is not None:
                at = self._prel + self._ppos
                dest[at : at + take] = buf[pos : pos + take]
            pos += take
            self._ppos += take
            if self._ppos < self._plen:
                self._rstart = self._rend = 0
                return
            self._end_payload()
        pending = self.pending
        structured = self.structured
        rbuf = self._rbuf
        while True:
            avail = end - pos
            if avail < 16:  # no reply header is shorter
                break
            # The first byte tells the two magics apart (0x67... simple,
            # 0x66... structured), so each header is unpacked just once.
            first = rbuf[pos]
            if first == _STRUCTURED_FIRST and structured:
                if avail >= 28:  # room for OFFSET_DATA's offset too
                    magic, flags, rtype, cookie, length, offset = _DATA_CHUNK.unpack_from(
                        rbuf, pos
                    )
                elif avail >= 20:
                    magic, flags, rtype, cookie, length = _CHUNK.unpack_from(rbuf, pos)
                    offset = -1
                else:
                    break
                if magic != _STRUCTURED_MAGIC:
                    return self._violation(f"bad reply magic {magic:#x}")
                req = pending.get(cookie)
                if req is None:
                    return self._violation(f"structured reply for unknown cookie {cookie}")
                if rtype == proto.NBD_REPLY_TYPE_OFFSET_DATA:
                    if offset < 0:
                        break  # the offset has not arrived yet
                    n = length - 8
                    rel = offset - req.offset
                    if req.cmd != _CMD_READ or n <= 0 or rel < 0 or rel + n > req.length:
                        return self._violation(
                            f"bad OFFSET_DATA chunk (offset {offset}, {n} bytes) for "
                            f"{_NAMES.get(req.cmd)} {req.offset}+{req.length}"
                        )
                    req.got += n
                    pos += 28
                    if end - pos < n:  # the payload is still on its way
                        self._payload(req, cookie, rel, n, bool(flags & _DONE), pos, end)
                        return
                    dest = req.buf
                    if dest is not None:
                        dest[rel : rel + n] = buf[pos : pos + n]
                    pos += n
                    if flags & _DONE:
                        del pending[cookie]
                        self._complete(req)
                        if self.phase != _TRANSMISSION:
                            return  # the reply was inconsistent
                    continue
                total = 20 + length
                if avail < total:
                    if length > _MAX_CHUNK:
                        return self._violation(f"structured chunk of {length} bytes")
                    self._need = total
                    break
                problem = self._chunk(req, rtype, buf, pos + 20, length)
                if problem:
                    return self._violation(problem)
                pos += total
                if flags & _DONE:
                    del pending[cookie]
                    self._complete(req)
                    if self.phase != _TRANSMISSION:
                        return
            elif first == _SIMPLE_FIRST:
                magic, error, cookie = _SIMPLE.unpack_from(rbuf, pos)
                if magic != _SIMPLE_MAGIC:
                    return self._violation(f"bad reply magic {magic:#x}")
                pos += 16
                req = pending.get(cookie)
                if req is None:
                    return self._violation(f"simple reply for unknown cookie {cookie}")
                if error:
                    req.error = _command_error(req.cmd, req.offset, req.length, error)
                elif req.cmd == _CMD_READ:
                    if structured:
                        return self._violation("simple reply with data to a structured READ")
                    n = req.length
                    if end - pos < n:
                        # Stays in pending until the payload is in (a loss fails it).
                        self._payload(req, cookie, 0, n, True, pos, end)
                        return
                    dest = req.buf
                    if dest is not None:
                        dest[:n] = buf[pos : pos + n]
                    pos += n
                elif req.cmd == _CMD_BLOCK_STATUS:
                    return self._violation("simple success reply to BLOCK_STATUS")
                del pending[cookie]
                self._complete(req)
            else:
                (magic,) = _U32.unpack_from(rbuf, pos)
                return self._violation(f"bad reply magic {magic:#x}")
        if pos >= end:
            self._rstart = self._rend = 0
        else:
            self._rstart = pos

    def _payload(
        self, req: _Request, cookie: int, rel: int, n: int, done: bool, pos: int, end: int
    ) -> None:
        """Start receiving an ``n`` byte payload for ``req`` at ``rel`` of which only
        ``end - pos`` bytes are buffered: copy those, then switch to payload state.

        The receive buffer is empty afterwards; :meth:`get_buffer` hands out
        the destination itself for a large remainder.
        """
        take = end - pos
        dest = req.buf
        if take and dest is not None:
            dest[rel : rel + take] = self._rview[pos:end]
        self._plen = n
        self._ppos = take
        self._prel = rel
        self._preq = req
        self._pcookie = cookie
        self._pdone = done
        self._rstart = self._rend = 0

    def _end_payload(self) -> None:
        self._plen = 0
        req = self._preq
        self._preq = None
        if self._pdone and req is not None:
            self.pending.pop(self._pcookie, None)
            self._complete(req)

    def _chunk(self, req: _Request, rtype: int, buf: memoryview, pos: int, length: int) -> str:
        """Handle one non-data structured chunk; return a problem description or ''."""
        if rtype == proto.NBD_REPLY_TYPE_NONE:
            return "" if length == 0 else f"NONE chunk with {length} bytes"
        if rtype == proto.NBD_REPLY_TYPE_OFFSET_HOLE:
            if length != _OFFSET_HOLE.size or req.cmd != _CMD_READ:
                return "bad OFFSET_HOLE chunk"
            offset, size = _OFFSET_HOLE.unpack_from(buf, pos)
            rel = offset - req.offset
            if size == 0 or rel < 0 or rel + size > req.length:
                return f"OFFSET_HOLE {offset}+{size} outside READ {req.offset}+{req.length}"
            req.got += size
            dest = req.buf
            if dest is not None:
                while size:
                    step = min(size, len(_ZEROS))
                    dest[rel : rel + step] = _ZEROS[:step]
                    rel += step
                    size -= step
            return ""
        if rtype == proto.NBD_REPLY_TYPE_BLOCK_STATUS:
            if req.cmd != _CMD_BLOCK_STATUS or length < 12 or (length - 4) % 8:
                return f"bad BLOCK_STATUS chunk ({length} bytes)"
            (ctx,) = _U32.unpack_from(buf, pos)
            if ctx != self.meta_id:
                return f"BLOCK_STATUS for unknown metadata context {ctx}"
            extents = req.extents
            if extents is None:
                extents = req.extents = []
            for size, flags in _DESCRIPTOR.iter_unpack(buf[pos + 4 : pos + length]):
                if not size:
                    return "zero-length block status descriptor"
                extents.append(Extent(size, flags))
            return ""
        if rtype & 0x8000:
            # Every error type (known or not) starts with error and message length.
            if length < _ERROR_PAYLOAD.size:
                return f"error chunk of {length} bytes"
            err, msglen = _ERROR_PAYLOAD.unpack_from(buf, pos)
            if msglen > length - _ERROR_PAYLOAD.size:
                return "error message longer than its chunk"
            start = pos + _ERROR_PAYLOAD.size
            message = bytes(buf[start : start + msglen]).decode("utf-8", "replace")
            error_offset = None
            if rtype == proto.NBD_REPLY_TYPE_ERROR_OFFSET:
                if length != _ERROR_PAYLOAD.size + msglen + 8:
                    return "bad ERROR_OFFSET chunk"
                (error_offset,) = _U64.unpack_from(buf, start + msglen)
            if req.error is None:
                # The spec: treat an error value of zero (or unknown) as EINVAL.
                req.error = _command_error(
                    req.cmd, req.offset, req.length, err or proto.NBD_EINVAL, message,
                    error_offset,
                )
            return ""
        return f"unknown structured reply type {rtype}"

    def _complete(self, req: _Request) -> None:
        """Resolve a request whose reply is complete (already out of ``pending``)."""
        fut = req.fut
        if not fut.done():  # a cancelled caller's future is done
            err = req.error
            if err is not None:
                fut.set_exception(err)
            elif req.cmd == _CMD_READ:
                if self.structured and req.got != req.length:
                    self._violation(f"READ reply covered {req.got} of {req.length} bytes")
                    fut.set_exception(NbdConnectionError(self.reason))  # not in pending any more
                    return
                fut.set_result(None)
            elif req.cmd == _CMD_BLOCK_STATUS:
                if not req.extents:
                    self._violation("BLOCK_STATUS reply without extents")
                    fut.set_exception(NbdConnectionError(self.reason))
                    return
                fut.set_result(req.extents)
            else:
                fut.set_result(None)
        if self._idle_waiter is not None:
            self._check_idle()

    # ------------------------------------------------------------------
    # Losing the connection

    def _violation(self, problem: str) -> None:
        """The server broke the protocol: nothing it sends can be trusted any more."""
        log.warning("NBD server %s: protocol violation: %s", self.where, problem)
        self._lose(NbdConnectionError, f"protocol violation by {self.where}: {problem}")

    def _lose(self, kind: type[NbdConnectionError], message: str) -> None:
        """Close for good: abort the transport, fail everything outstanding."""
        if self.phase == _CLOSED:
            return
        self.phase = _CLOSED
        self.reason = message
        self._plen = 0
        self._preq = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.abort()
        pending = self.pending
        self.pending = {}
        for req in pending.values():
            fut = req.fut
            if not fut.done():
                fut.set_exception(kind(message))  # one instance per waiter
        self._wake_writers()
        waiter = self._idle_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def abort(self, message: str) -> None:
        """Close now; outstanding requests fail with NbdConnectionError(``message``)."""
        self._lose(NbdConnectionError, message)

    def close_transport(self) -> None:
        """Close after DISC: queued bytes are still sent, then the socket is closed."""
        self.flush_out()
        self.phase = _CLOSED
        self.reason = f"connection to {self.where} closed by the client"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()

    def _watch(self) -> None:
        """Watchdog tick: abort if the oldest outstanding request is too old.

        Each tick records the last cookie issued so far.  A request whose
        cookie is at most a mark's cookie was issued before that mark's time,
        so its age is at least now minus that time.  Cookies grow and dicts
        keep insertion order, so the first pending cookie is the oldest.
        This costs nothing per request, and detects a stuck request between
        ``timeout`` and ``timeout`` plus one tick after it was issued.
        """
        timeout = self._timeout
        assert timeout is not None
        now = self._loop.time()
        marks = self._marks
        marks.append((now, self._cookie))
        if self.pending:
            oldest = next(iter(self.pending))
            for when, cookie in marks:
                if oldest <= cookie:
                    if now - when >= timeout:
                        req = self.pending[oldest]
                        name = _NAMES.get(req.cmd, str(req.cmd))
                        self._lose(
                            NbdTimeoutError,
                            f"{name} at offset {req.offset} length {req.length} not answered "
                            f"by {self.where} within {timeout:g} s; connection aborted",
                        )
                        return
                    break
        self._timer = self._loop.call_later(timeout / 4, self._watch)


def _valid_block_sizes(minimum: int, preferred: int, maximum: int) -> bool:
    """Whether NBD_INFO_BLOCK_SIZE values satisfy the spec's constraints."""
    def pow2(value: int) -> bool:
        return value > 0 and not value & (value - 1)

    return (
        pow2(minimum) and minimum <= 65536
        and pow2(preferred) and preferred >= max(512, minimum)
        and maximum >= preferred
        and (maximum % minimum == 0 or maximum == proto.NBD_MAX_BLOCK_LIMIT)
    )


def _writable_view(buf: Any) -> memoryview:
    """A writable, flat unsigned-byte view of ``buf`` (so slices can be assigned)."""
    view = buf if type(buf) is memoryview else memoryview(buf)
    if view.readonly:
        raise TypeError("readinto needs a writable buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _data_view(data: Any) -> Any:
    """``data`` itself if it is bytes or bytearray, else a flat byte memoryview of it."""
    if type(data) is bytes or type(data) is bytearray:
        return data
    view = data if type(data) is memoryview else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


# --- The client -------------------------------------------------------------------


class NbdClient:
    """One NBD connection with many requests in flight; create it with ``connect_*``."""

    def __init__(self, conn: _Connection, export: str) -> None:
        """Wrap a negotiated connection (use :func:`connect_tcp` and friends instead)."""
        self._c = conn
        self.export = export
        self.size: int = conn.size
        self.flags: int = conn.flags
        self.min_block: int = conn.min_block
        self.preferred_block: int = conn.preferred_block
        self.max_block: int = conn.max_block
        self.description: str = conn.description
        self.uri: str = conn.where
        self._close_started = False

    def __repr__(self) -> str:
        """Where it is connected and how busy it is."""
        state = "closed" if self.closed else f"{self.in_flight} in flight"
        return f"<NbdClient {self.uri} size={self.size} {state}>"

    # --- negotiated properties --------------------------------------------------

    @property
    def read_only(self) -> bool:
        """The export is read-only (writes fail with EPERM)."""
        return bool(self.flags & proto.NBD_FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        """The server advertised NBD_CMD_FLUSH."""
        return bool(self.flags & proto.NBD_FLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        """The server advertised NBD_CMD_FLAG_FUA."""
        return bool(self.flags & proto.NBD_FLAG_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        """The server advertised NBD_CMD_TRIM."""
        return bool(self.flags & proto.NBD_FLAG_SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        """The server advertised NBD_CMD_WRITE_ZEROES."""
        return bool(self.flags & proto.NBD_FLAG_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        """The server advertised NBD_CMD_FLAG_FAST_ZERO."""
        return bool(self.flags & proto.NBD_FLAG_SEND_FAST_ZERO)

    @property
    def can_multi_conn(self) -> bool:
        """The server advertised NBD_FLAG_CAN_MULTI_CONN."""
        return bool(self.flags & proto.NBD_FLAG_CAN_MULTI_CONN)

    @property
    def can_cache(self) -> bool:
        """The server advertised NBD_CMD_CACHE."""
        return bool(self.flags & proto.NBD_FLAG_SEND_CACHE)

    @property
    def can_block_status(self) -> bool:
        """base:allocation was negotiated, so :meth:`block_status` works."""
        return self._c.structured and self._c.meta_id is not None

    @property
    def structured(self) -> bool:
        """Structured replies were negotiated."""
        return self._c.structured

    @property
    def tls(self) -> bool:
        """The connection runs over TLS."""
        return self._c.tls

    @property
    def arena(self) -> Any:
        """The shared arena the server accepted (drove.nbd.arena), or None."""
        return self._c.arena

    @property
    def in_flight(self) -> int:
        """Requests sent (or waiting to be sent) and not yet answered."""
        return len(self._c.pending)

    @property
    def closed(self) -> bool:
        """The connection is closed, closing, aborted or lost."""
        return self._c.phase != _TRANSMISSION or self._c.closing

    @property
    def lost(self) -> asyncio.Future[None]:
        """A future resolved once the socket is gone, whoever closed it (never cancel it)."""
        return self._c.lost

    @property
    def reason(self) -> str:
        """Why the connection is closed ("" while it is open)."""
        return self._c.reason

    # --- I/O ------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        """Read ``length`` bytes at ``offset``."""
        c = self._c
        if 0 < length <= c.piece and not c.write_paused:
            buf = bytearray(length)
            req = c.start(_CMD_READ, 0, offset, length, None, memoryview(buf))
            await req.fut  # (a cancelled read's payload lands in buf, which nobody sees)
            return buf
        if length < 0:
            raise _local_error(errno.EINVAL, _CMD_READ, f"negative length {length}")
        buf = bytearray(length)
        if length:
            await self._readinto(offset, memoryview(buf), length)
        else:
            self._check_open()
        return buf

    def submit(self, cmd: int, offset: int, length: int, data: Any, fua: bool,
               done: eager.Done) -> None:
        """READ, WRITE or FLUSH in callback style (see :mod:`drove.nbd.eager`).

        A READ's value is a new ``bytearray``.  Requests that need splitting,
        flow control or FUA emulation take the coroutine path.
        """
        c = self._c
        if not c.write_paused and c.phase == _TRANSMISSION and not c.closing:
            try:
                if cmd == _CMD_WRITE:
                    if 0 < length <= c.piece and (not fua or self.flags & proto.NBD_FLAG_SEND_FUA):
                        flags = proto.NBD_CMD_FLAG_FUA if fua else 0
                        where = c.arena.offset_of(data) if c.arena is not None and \
                            length >= _ARENA_MIN else None
                        if where is not None:  # the data is in the shared arena: send where
                            cmd, data = _CMD_WRITE_ARENA, _U64.pack(where)
                        c.start(cmd, flags, offset, length, data, None,
                                _Callback(c._loop, done, None))
                        return
                elif cmd == _CMD_READ:
                    slot = c.arena.take(length) if c.arena is not None and \
                        length >= _ARENA_MIN else None
                    if slot is not None:  # the server reads into the shared arena
                        _, data = slot
                        c.start(_CMD_READ_ARENA, 0, offset, length,
                                _U64.pack(c.arena.offset_of(data)), None,
                                _ArenaCallback(c._loop, done, data, c.arena,
                                               c.arena_writer))
                        return
                    if 0 < length <= c.piece:
                        buf = bytearray(length)
                        c.start(_CMD_READ, 0, offset, length, None, memoryview(buf),
                                _Callback(c._loop, done, buf))
                        return
                elif self.flags & proto.NBD_FLAG_SEND_FLUSH:
                    c.start(proto.NBD_CMD_FLUSH, 0, 0, 0, None, None,
                            _Callback(c._loop, done, None))
                    return
            except Exception as exc:
                c._loop.call_soon(done, None, exc)
                return
        if cmd == _CMD_READ:
            eager.run(self.read(offset, length), done)
        elif cmd == _CMD_WRITE:
            eager.run(self.write(offset, data, fua=fua), done)
        else:
            eager.run(self.flush(), done)

    async def readinto(self, offset: int, buf: Any) -> None:
        """Read ``len(buf)`` bytes at ``offset`` straight into the writable buffer ``buf``."""
        view = _writable_view(buf)
        length = view.nbytes
        c = self._c
        if 0 < length <= c.piece and not c.write_paused:
            # The common case inline: one coroutine frame per request.
            req = c.start(_CMD_READ, 0, offset, length, None, view)
            try:
                await req.fut
            except asyncio.CancelledError:
                req.buf = None  # the payload must not land in a buffer the caller gave up
                raise
        elif length:
            await self._readinto(offset, view, length)
        else:
            self._check_open()

    async def _readinto(self, offset: int, view: memoryview, length: int) -> None:
        c = self._c
        if length > c.piece:
            await self._split(_CMD_READ, 0, offset, length, view, c.piece)
            return
        req = c.start(_CMD_READ, 0, offset, length, None, view)
        try:
            if req.hdr is not None:
                await c.send_later(req)
            await req.fut
        except asyncio.CancelledError:
            req.buf = None
            raise

    async def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        """Write the bytes-like ``data`` at ``offset``.

        ``data`` is not copied: the transport may send straight from it, so
        it must stay unchanged until the call returns (or, if the call is
        cancelled, until the connection is closed).
        """
        data = _data_view(data)
        length = len(data)  # bytes, bytearray or a flat byte memoryview
        if not length:
            self._check_open()
            return
        c = self._c
        flags, emulate = self._fua(fua)
        if length > c.piece:
            await self._split(_CMD_WRITE, flags, offset, length, memoryview(data), c.piece)
        else:
            req = c.start(_CMD_WRITE, flags, offset, length, data)
            if req.hdr is not None:
                await c.send_later(req)
            await req.fut
        if emulate:
            await self.flush()

    def _fua(self, fua: bool) -> tuple[int, bool]:
        """Command flags for ``fua``, and whether a FLUSH must stand in for it.

        The spec forbids the FUA flag unless the server advertised it; a
        server that can flush but not FUA gets a flush after the command.
        """
        if not fua:
            return 0, False
        if self.flags & proto.NBD_FLAG_SEND_FUA:
            return proto.NBD_CMD_FLAG_FUA, False
        return 0, self.can_flush

    async def zero(
        self, offset: int, length: int, *, fua: bool = False, may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        """Make the range read as zeros (NBD_CMD_WRITE_ZEROES).

        ``may_trim=False`` sets NO_HOLE (keep the range allocated); ``fast``
        sets FAST_ZERO: fail with ENOTSUP rather than zero slowly.
        """
        cmd = proto.NBD_CMD_WRITE_ZEROES
        self._check_write_cmd(cmd, self.can_zero)
        if fast and not self.can_fast_zero:
            raise _local_error(errno.ENOTSUP, cmd, "the server cannot zero fast")
        if length <= 0:
            return self._check_empty(cmd, offset, length)
        flags, emulate = self._fua(fua)
        if not may_trim:
            flags |= proto.NBD_CMD_FLAG_NO_HOLE
        if fast:
            flags |= proto.NBD_CMD_FLAG_FAST_ZERO
        # The server may cap WRITE_ZEROES by the maximum block size, except fast ones.
        await self._split(cmd, flags, offset, length, None, _BIG_PIECE if fast else self._c.piece)
        if emulate:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard the range (NBD_CMD_TRIM)."""
        cmd = proto.NBD_CMD_TRIM
        self._check_write_cmd(cmd, self.can_trim)
        if length <= 0:
            return self._check_empty(cmd, offset, length)
        flags, emulate = self._fua(fua)
        await self._split(cmd, flags, offset, length, None, _BIG_PIECE)
        if emulate:
            await self.flush()

    async def flush(self) -> None:
        """Make every completed write durable (a no-op if the server has no FLUSH)."""
        c = self._c
        if not self.flags & proto.NBD_FLAG_SEND_FLUSH:
            # No FLUSH advertised: the server has no volatile cache to flush.
            self._check_open()
            return
        req = c.start(proto.NBD_CMD_FLUSH, 0, 0, 0)
        if req.hdr is not None:
            await c.send_later(req)
        await req.fut

    async def cache(self, offset: int, length: int) -> None:
        """Ask the server to prefetch the range (a no-op if it has no CACHE)."""
        cmd = proto.NBD_CMD_CACHE
        c = self._c
        self._check_open()
        if not self.can_cache:
            return  # only a hint
        if length <= 0:
            return self._check_empty(cmd, offset, length)
        await self._split(cmd, 0, offset, length, None, c.piece)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """base:allocation extents from ``offset``; they may cover less than ``length``."""
        cmd = _CMD_BLOCK_STATUS
        c = self._c
        self._check_open()
        if not self.can_block_status:
            raise _local_error(errno.ENOTSUP, cmd, "base:allocation was not negotiated")
        if offset < 0 or length < 0:
            raise _local_error(errno.EINVAL, cmd, f"bad range {offset}+{length}")
        if not length:
            return []
        # One request answers at most a u32 length; clip to the export too
        # (past its end the server's EINVAL is the answer).
        limit = proto.NBD_MAX_BLOCK_LIMIT - proto.NBD_MAX_BLOCK_LIMIT % self.min_block
        ask = min(length, limit)
        if offset < self.size:
            ask = min(ask, self.size - offset)
        req = c.start(cmd, 0, offset, ask)
        if req.hdr is not None:
            await c.send_later(req)
        extents: list[Extent] = await req.fut
        # A server may describe more than was asked: cut at the requested end.
        out: list[Extent] = []
        left = ask
        for extent in extents:
            if extent.length >= left:
                out.append(extent if extent.length == left else Extent(left, extent.flags))
                break
            out.append(extent)
            left -= extent.length
        return out

    def _check_open(self) -> None:
        """Raise NbdConnectionError if no request can be sent any more."""
        c = self._c
        if c.phase != _TRANSMISSION or c.closing:
            raise c.closed_error()

    def _check_write_cmd(self, cmd: int, supported: bool) -> None:
        """Refuse locally what must not be sent: on a closed connection, or unadvertised."""
        self._check_open()
        if not supported:
            if self.read_only:
                raise _local_error(errno.EPERM, cmd, "the export is read-only")
            raise _local_error(errno.ENOTSUP, cmd, "not supported by the server")

    def _check_empty(self, cmd: int, offset: int, length: int) -> None:
        """A zero-length request does nothing; a negative one is invalid."""
        if length < 0 or offset < 0:
            raise _local_error(errno.EINVAL, cmd, f"bad range {offset}+{length}")

    async def _split(
        self, cmd: int, flags: int, offset: int, length: int, view: memoryview | None,
        step: int,
    ) -> None:
        """Run a request as pieces of at most ``step`` bytes, up to _PIECE_WINDOW at once.

        Every piece is waited for even after one failed, so that no payload
        lands in the caller's buffer after this returns; the first error
        is raised.
        """
        if offset < 0:
            raise _local_error(errno.EINVAL, cmd, f"negative offset {offset}")
        c = self._c
        reads = cmd == _CMD_READ
        window: collections.deque[_Request] = collections.deque()
        error: BaseException | None = None
        pos = 0
        try:
            while pos < length:
                if len(window) >= _PIECE_WINDOW:
                    # Awaited while still in the window, so a cancellation reaches it.
                    error = await _settle(window[0], error)
                    window.popleft()
                n = min(step, length - pos)
                piece = view[pos : pos + n] if view is not None else None
                try:
                    if reads:
                        req = c.start(cmd, flags, offset + pos, n, None, piece)
                    else:
                        req = c.start(cmd, flags, offset + pos, n, piece)
                except (NbdConnectionError, NbdCommandError) as exc:
                    error = error or exc
                    break
                window.append(req)
                if req.hdr is not None:
                    await c.send_later(req)
                pos += n
            while window:
                error = await _settle(window[0], error)
                window.popleft()
        except asyncio.CancelledError:
            for req in window:
                req.buf = None
                req.fut.cancel()
            raise
        if error is not None:
            raise error

    # --- closing ---------------------------------------------------------------

    async def close(self) -> None:
        """Wait for outstanding replies, send NBD_CMD_DISC and close; idempotent."""
        c = self._c
        if self._close_started:
            await asyncio.wait([c.lost], timeout=_CLOSE_TIMEOUT)
            return
        self._close_started = True
        c.closing = True
        try:
            await c.wait_idle()
        except asyncio.CancelledError:
            # A close cut short must not leave a half-closed connection behind.
            c.abort(f"close() of the connection to {c.where} was cancelled")
            raise
        if c.phase == _TRANSMISSION:
            c.send_disc()
            c.close_transport()
        # asyncio.wait never cancels c.lost, whoever else waits for it.
        _, pending = await asyncio.wait([c.lost], timeout=_CLOSE_TIMEOUT)
        if pending and c._transport is not None:
            c._transport.abort()

    def abort(self) -> None:
        """Close at once; outstanding requests fail with NbdConnectionError."""
        c = self._c
        c.closing = True
        c.abort(f"connection to {c.where} aborted by the client")

    async def __aenter__(self) -> NbdClient:
        """``async with await connect_uri(...) as client:``."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close on leaving the block."""
        await self.close()


async def _settle(req: _Request, error: BaseException | None) -> BaseException | None:
    """Wait for one piece; return the first error seen so far."""
    try:
        await req.fut
    except (NbdCommandError, NbdConnectionError) as exc:
        return error or exc
    return error


# --- Connecting -------------------------------------------------------------------


async def _connect(
    opener: Callable[[Callable[[], _Connection]], Awaitable[tuple[Any, _Connection]]],
    where: str,
    export: str,
    *,
    tls: ssl.SSLContext | None,
    server_hostname: str | None,
    connect_timeout: float | None,
    request_timeout: float | None,
    block_status: bool,
    arena: Any = None,
) -> NbdClient:
    """Open a transport with ``opener``, negotiate, and wrap the result."""
    if request_timeout is not None and request_timeout <= 0:
        raise ValueError("request_timeout must be positive (or None)")
    loop = asyncio.get_running_loop()
    conn: _Connection | None = None

    def factory() -> _Connection:
        nonlocal conn
        conn = _Connection(loop, where)
        return conn

    try:
        async with asyncio.timeout(connect_timeout):
            await opener(factory)
            assert conn is not None
            await conn.handshake(export, tls, server_hostname, block_status, arena)
    except TimeoutError:
        if conn is not None:
            conn.abort_handshake()
        raise NbdTimeoutError(
            f"connecting to {where} timed out after {connect_timeout:g} s"
        ) from None
    except BaseException:
        if conn is not None:
            conn.abort_handshake()
        raise
    conn.start_transmission(request_timeout)
    return NbdClient(conn, export)


def _tcp_uri(scheme: str, host: str, port: int, export: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}/{quote(export)}"


async def connect_tcp(
    host: str,
    port: int = DEFAULT_PORT,
    export: str = "",
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float | None = 10.0,
    request_timeout: float | None = None,
    block_status: bool = True,
) -> NbdClient:
    """Connect to ``export`` on ``host:port`` (TLS when ``tls`` is given)."""
    loop = asyncio.get_running_loop()
    where = _tcp_uri("nbds" if tls else "nbd", host, port, export)

    async def opener(factory: Callable[[], _Connection]) -> tuple[Any, _Connection]:
        return await loop.create_connection(factory, host, port)

    return await _connect(
        opener, where, export, tls=tls, server_hostname=server_hostname or host,
        connect_timeout=connect_timeout, request_timeout=request_timeout,
        block_status=block_status,
    )


async def connect_unix(
    path: str | os.PathLike[str],
    export: str = "",
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float | None = 10.0,
    request_timeout: float | None = None,
    block_status: bool = True,
    arena: Any = None,
) -> NbdClient:
    """Connect to ``export`` on the unix socket ``path``.

    ``arena`` (a :class:`drove.nbd.arena.Arena`) is offered to the server: a
    drove replica then takes large writes from it and answers large reads into
    it, by offset.
    """
    loop = asyncio.get_running_loop()
    path = os.fspath(path)
    where = f"{'nbds' if tls else 'nbd'}+unix:///{quote(export)}?socket={path}"

    async def opener(factory: Callable[[], _Connection]) -> tuple[Any, _Connection]:
        return await loop.create_unix_connection(factory, path)

    return await _connect(
        opener, where, export, tls=tls, server_hostname=server_hostname,
        connect_timeout=connect_timeout, request_timeout=request_timeout,
        block_status=block_status, arena=arena,
    )


STATUS_REQUEST = 1 << 30
"""Length asked of one BLOCK_STATUS request by :func:`extents` (the server may answer for less)."""


async def extents(client: NbdClient, start: int, end: int) -> AsyncIterator[tuple[int, int, bool]]:
    """(offset, length, data) covering [start, end), one BLOCK_STATUS request ahead."""

    def ask(pos: int) -> asyncio.Future[Any]:
        return asyncio.ensure_future(client.block_status(pos, min(end - pos, STATUS_REQUEST)))

    pos = start
    nxt: asyncio.Future[Any] | None = ask(pos)
    try:
        while pos < end:
            assert nxt is not None
            got = await nxt
            nxt = None
            covered = sum(e.length for e in got)
            if covered <= 0:
                raise OSError(errno.EIO, f"source answered block status at {pos} with nothing")
            if pos + covered < end:
                nxt = ask(pos + covered)
            for e in got:
                n = min(e.length, end - pos)
                if n <= 0:
                    break
                yield pos, n, not e.flags & proto.NBD_STATE_HOLE
                pos += n
    finally:
        if nxt is not None:
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt


class NbdUri(NamedTuple):
    """A parsed NBD URI: TCP (host, port) or unix (socket), and the export."""

    tls: bool
    host: str | None
    port: int
    socket: str | None
    export: str
    query: dict[str, str]


def parse_uri(uri: str) -> NbdUri:
    """Parse ``nbd[s]://host[:port]/export`` or ``nbd[s]+unix:///export?socket=PATH``."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
        raise ValueError(f"not an NBD URI (nbd://, nbds://, nbd+unix://): {uri!r}")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    tls = scheme.startswith("nbds")
    if scheme.endswith("+unix"):
        if parts.netloc:
            raise ValueError(f"a unix NBD URI has no host: {uri!r}")
        sock = query.get("socket")
        if not sock:
            raise ValueError(f"a unix NBD URI needs ?socket=PATH: {uri!r}")
        return NbdUri(tls, None, 0, sock, export, query)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"bad port in NBD URI {uri!r}") from exc
    if not parts.hostname:
        raise ValueError(f"NBD URI without a host: {uri!r}")
    return NbdUri(tls, parts.hostname, port, None, export, query)


def tls_context_from_dir(directory: str | os.PathLike[str]) -> ssl.SSLContext:
    """A client TLS context from a libnbd/qemu style certificate directory.

    ``ca-cert.pem`` verifies the server; ``client-cert.pem`` and
    ``client-key.pem``, when present, authenticate the client.
    """
    path = Path(directory)
    ctx = ssl.create_default_context(cafile=str(path / "ca-cert.pem"))
    if (path / "client-cert.pem").exists():
        ctx.load_cert_chain(str(path / "client-cert.pem"), str(path / "client-key.pem"))
    return ctx


async def connect_uri(
    uri: str,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float | None = 10.0,
    request_timeout: float | None = None,
    block_status: bool = True,
    arena: Any = None,
) -> NbdClient:
    """Connect to an NBD URI; nbds:// uses ``tls``, else ?tls-certificates=DIR, else system CAs.

    The export is the URI path without its leading ``/``.  Passing ``tls``
    turns TLS on for an ``nbd://`` URI as well.  ``arena``: see
    :func:`connect_unix` (unix sockets only).
    """
    parsed = parse_uri(uri)
    if parsed.tls and tls is None:
        certs = parsed.query.get("tls-certificates")
        tls = tls_context_from_dir(certs) if certs else ssl.create_default_context()
    kw: dict[str, Any] = {
        "tls": tls, "server_hostname": server_hostname or parsed.query.get("tls-hostname"),
        "connect_timeout": connect_timeout, "request_timeout": request_timeout,
        "block_status": block_status,
    }
    if parsed.socket is not None:
        return await connect_unix(parsed.socket, parsed.export, arena=arena, **kw)
    assert parsed.host is not None
    return await connect_tcp(parsed.host, parsed.port, parsed.export, **kw)
