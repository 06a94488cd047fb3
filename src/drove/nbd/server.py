"""Asyncio NBD server: fixed newstyle handshake, pipelined transmission.

One :class:`NbdServer` serves the exports of an :class:`ExportProvider` on
any number of TCP and unix listeners.  Each connection is an
:class:`asyncio.BufferedProtocol`: the handshake runs as a small coroutine
over a private buffer, and the transmission phase parses requests straight
out of the receive buffer in ``buffer_updated`` (no per-request Task, no
stream reader).

Hot path design, because this server sits in front of every volume:

* The transport reads into our own receive buffer (no ``bytes`` object per
  read); a large write payload is read by the kernel straight into the
  buffer that is handed to the export, recycled from the previous large
  write when it is free.
* Requests are parsed with one precompiled ``Struct.unpack_from`` each and
  validated before the export is called.  A small write payload is handed
  over as a read-only ``memoryview`` into the receive buffer (zero copy).
* The export's coroutine is started eagerly (``coro.send(None)``).  If it
  finishes on its first step (the chain export's synchronous pread/pwrite),
  the reply is built at once; only a coroutine that really suspends is
  continued inside a Task.  Replies go out in completion order.
* Replies produced while one received batch is being parsed are corked and
  sent with a single ``writelines`` (one syscall for a whole pipelined
  batch); replies of suspended requests go out with one ``writelines`` each.
* Backpressure: parsing and reading stop while a connection has too many
  requests (or bytes) in flight, or while the transport's write buffer is
  above its high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import struct
import types
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from drove.nbd import arena as arenas
from drove.nbd import eager, proto
from drove.nbd.errors import ConnectionClosed, ExportRefused, HandshakeError, ProtocolError
from drove.nbd.export import Capabilities, Export, ExportProvider, Extent

log = logging.getLogger(__name__)

__all__ = ["HandoffRefused", "NbdServer", "block_sizes"]

# Sizes of the two most common wire units, named for readability.
_REQ = proto.REQUEST.size  # 28
_MAX_OPTION_DATA = 64 * 1024  # longest option payload accepted (names are <= 4096)
_HANDSHAKE_BUFFER = 256 * 1024  # stop reading while this much handshake data is queued
_CORK_LIMIT = 256 * 1024  # flush a corked batch early beyond this many bytes
# ... or beyond this many replies: the client (an engine, or fio behind it) starts on
# the first replies while this side still works through the batch.  Sending a whole
# batch of 16 at once left the processes of a volume waiting on each other in turn
# (measured: 4k random reads on a 1-replica volume +25% with batches of 8).
_CORK_REPLIES = 8
_RBUF_SIZE = 256 * 1024  # receive buffer of the transmission phase
_SOCKET_SNDBUF = 4 * 1024 * 1024
_WRITE_HIGH_WATER = 8 * 1024 * 1024  # queued reply bytes before we stop reading requests
_MIN_FREE = 32 * 1024  # compact or replace the receive buffer below this much room
_INLINE_MAX = 64 * 1024  # write payloads up to this size are parsed in the receive buffer
_NEED_MORE = -2  # _request: the request is incomplete, parse it again later
_META_CONTEXT_ID = 1  # the id of base:allocation on every connection
_WRITE_COMMANDS = frozenset(
    (proto.NBD_CMD_WRITE, proto.NBD_CMD_TRIM, proto.NBD_CMD_WRITE_ZEROES)
)  # refused with NBD_EPERM on a read-only export

# Request kinds used to route a completion to its reply builder.
_K_READ = 0
_K_OK = 1  # any command whose success reply is a bare simple reply
_K_BLOCK_STATUS = 2
_K_BLOCK_STATUS_ONE = 3

_HANDSHAKE = 0
_TRANSMISSION = 1
_CLOSED = 2

_NO_DATA = b""
_U64 = struct.Struct(">Q")
_CoroutineType = types.CoroutineType


def _pow2_at_least(value: int) -> int:
    """The smallest power of two >= ``value`` (and >= 1)."""
    return 1 << max(0, value - 1).bit_length()


def block_sizes(caps: Capabilities) -> tuple[int, int, int]:
    """The (minimum, preferred, maximum) block sizes advertised and enforced.

    The export's values, made valid as the spec demands, so that a slightly
    wrong Capabilities never makes clients refuse the server: the minimum
    is a power of two up to 64 KiB, the preferred size a power of two of at
    least max(minimum, 512), the maximum a multiple of the minimum that is
    at least the preferred size.  The maximum is also capped at 2**31 so a
    structured read chunk (8 + length bytes) fits its 32-bit length field.
    """
    minimum = min(_pow2_at_least(caps.min_block), 65536)
    preferred = _pow2_at_least(max(caps.preferred_block, minimum, 512))
    maximum = min(caps.max_block, 1 << 31)
    maximum = max(maximum - maximum % minimum, preferred)
    return minimum, preferred, maximum


class HandoffRefused(Exception):
    """A connection or listener that cannot be handed to another process (the message says
    why: TLS, a shared arena)."""


def _message(text: str) -> bytes:
    """Encode a human-readable error message within the spec's string limit."""
    raw = text.encode("utf-8", "replace")
    if len(raw) > proto.NBD_MAX_STRING:
        # Cut at a character boundary: the spec wants valid UTF-8.
        raw = raw[: proto.NBD_MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw


class _Submitted:
    """The ``done`` callback of one submitted request (an object: cheaper than a closure)."""

    __slots__ = ("conn", "flags", "handle", "kind", "length", "offset", "recycle")

    def __init__(self, conn: _Connection, kind: int, handle: int, flags: int, offset: int,
                 length: int, recycle: bytearray | memoryview | None) -> None:
        self.conn: _Connection | None = conn  # None once completed
        self.kind = kind
        self.handle = handle
        self.flags = flags
        self.offset = offset
        self.length = length
        self.recycle = recycle

    def __call__(self, value: Any, exc: BaseException | None) -> None:
        """The request completed: reply (once; a second call is a bug, logged)."""
        conn = self.conn
        if conn is None:
            log.error("NBD request %#x completed twice", self.handle)
            return
        self.conn = None
        conn._done(self.kind, self.handle, self.flags, self.offset, self.length, self.recycle,
                   value, exc)


class _Connection(asyncio.BufferedProtocol):
    """One client connection: handshake coroutine, then the transmission parser.

    A BufferedProtocol, so the transport reads straight into our memory: a
    reusable receive buffer for headers and small payloads, or the final
    buffer of a large write payload.  A write payload handed to the export
    is a read-only view into that memory; it stays valid until the export
    call completes.  If a call suspends, the receive buffer is "pinned" and
    replaced instead of being reused.
    """

    def __init__(self, server: NbdServer,
                 adopt: tuple[dict[str, Any], bytes] | None = None) -> None:
        """Create the protocol for a new connection of ``server``; with ``adopt`` (the state
        and unparsed bytes from :meth:`handoff_state`), for one another process handed over
        in its transmission phase."""
        self._server = server
        self._adopt = adopt
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._phase = _HANDSHAKE
        self._peer: Any = None
        self.closed = self._loop.create_future()

        # Handshake state.
        self._hbuf = bytearray()
        self._hwaiter: asyncio.Future[None] | None = None
        self._hpaused = False
        self._eof = False
        self._handshake_task: asyncio.Task[None] | None = None
        self._tls_active = False
        self._structured = False
        self._meta_export: str | None = None  # export the contexts were set for
        self._meta_selected = False
        self._export_chosen = ""  # the name the client chose the export by

        # Transmission state (filled in by _enter_transmission).
        self._export: Export | None = None
        self._submit: eager.Submit | None = None  # the export's callback-style entry
        self._size = 0  # the export's size as last seen; refreshed when exceeded
        self._tflags = 0
        self._readonly = False
        self._read_flags = 0  # command flags READ accepts
        self._write_flags = 0  # command flags WRITE accepts
        self._flags_of: list[int] = [0] * 8  # accepted command flags, by command
        self._min_block = 1
        self._align = 0  # fast alignment test: (offset | length) & _align
        self._max_block = proto.NBD_DOS_THRESHOLD
        self._max_other = proto.NBD_MAX_BLOCK_LIMIT  # cap for CACHE
        self._skip_limit = proto.NBD_DOS_THRESHOLD
        self._block_status_ok = False

        # Receive buffers.  Unparsed bytes are _rbuf[_rstart:_rend].
        self._hview = memoryview(bytearray(64 * 1024))  # handshake reads land here
        self._rbuf = bytearray()
        self._rview = memoryview(self._rbuf)
        self._rview_ro = self._rview.toreadonly()  # payload views handed to exports
        self._rstart = 0
        self._rend = 0
        self._pinned = False  # a suspended export call holds a view into _rbuf
        self._direct = False  # the last get_buffer handed out _fill or a scratch buffer
        self._scratch: memoryview | None = None  # where skipped payload bytes go
        self._fill: memoryview | None = None  # a large write payload being received
        self._fill_buf = bytearray()  # the memory behind _fill
        self._spare: bytearray | None = None  # a payload buffer to reuse (no page faults)
        self._fill_pos = 0
        self._streaming = False  # a large payload just ended: the next read is kept short
        self._sent_slots: list[memoryview] = []  # arena slots in replies not yet sent
        self._release_timer: asyncio.TimerHandle | None = None
        self._arena: memoryview | None = None  # the client's shared arena, if it gave one
        self._fill_req: tuple[int, int, int] = (0, 0, 0)  # flags, handle, offset
        self._skip = 0  # payload bytes of a refused write still to discard
        self._blocked = False  # parsing stopped (backpressure, DISC, close)
        self._resume_scheduled = False

        # Flow control and completion.
        self._inflight = 0
        self._inflight_bytes = 0
        self._write_paused = False
        self._reading_paused = False
        self._disc = False
        self._shutdown = False
        # Being handed to another process (an engine upgrade): nothing more is parsed or
        # read; requests already started finish and their replies are sent.
        self._frozen = server._frozen
        self._tasks: set[asyncio.Task[None]] = set()

        # Reply corking: replies produced while parsing one batch of requests, or
        # completing in one turn of the event loop, leave in one writev.  Each
        # write to a socket whose reader sleeps wakes it, which on a VM costs a
        # cross-CPU interrupt; an engine behind this server completes its
        # requests from replica replies, many per turn.
        self._corked = False
        self._deferred = False
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_bytes = 0
        self._out_replies = 0

    # ------------------------------------------------------------------
    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the handshake on a new connection."""
        self._transport = transport  # type: ignore[assignment]
        self._peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small replies must not wait for Nagle (the spec says SHOULD).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A deep write buffer lets a pipelined batch of large reads be queued
        # without bouncing between pause_writing and resume_writing.
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        if sock is not None:
            # A reply larger than the socket buffer is copied into the transport's
            # own buffer and sent piecemeal later; a send buffer that holds a few
            # 1 MiB replies lets them go straight to the kernel.  Measured on
            # 1 MiB reads over a unix socket: 346 -> 240 us of CPU per request.
            with contextlib.suppress(OSError):
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < _SOCKET_SNDBUF:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_SNDBUF)
        self._server._connections.add(self)
        log.debug("connection from %s", self._peer)
        if self._adopt is not None:
            state, pending = self._adopt
            self._adopt = None
            self._resume_from(state, pending)
            return
        self._handshake_task = self._loop.create_task(self._handshake())

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; in-flight export calls finish, their replies are dropped."""
        if exc is not None:
            log.debug("connection %s lost: %s", self._peer, exc)
        self._phase = _CLOSED
        self._eof = True
        self._blocked = True
        self._out.clear()
        self._wake()
        if self._fill is not None and type(self._fill_buf) is memoryview:
            # A payload cut short in an arena slot: the slot is free again.
            self._fill = None
            self._server.arena.give_back(self._fill_buf)  # type: ignore[union-attr]
        if self._sent_slots:
            self._release_sent()  # the transport's buffer is gone, or soon will be
        self._server._connections.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def eof_received(self) -> bool | None:
        """The client half-closed: stop reading, finish in-flight work, then close."""
        self._eof = True
        self._wake()
        if self._phase != _TRANSMISSION:
            return None  # let the transport close itself
        # Like NBD_CMD_DISC: answer what is outstanding, then close ourselves.
        self._disc = True
        self._blocked = True
        self._maybe_finish_disc()
        # (A TLS transport closes on EOF whatever we return, and warns.)
        return None if self._tls_active else True

    def pause_writing(self) -> None:
        """The client is not reading replies: stop accepting requests."""
        self._write_paused = True
        self._update_flow()

    def resume_writing(self) -> None:
        """Replies drained: accept requests again."""
        self._write_paused = False
        self._update_flow()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the transport should put the next bytes it reads."""
        if self._phase != _TRANSMISSION:
            return self._hview
        fill = self._fill
        if fill is not None:
            if len(fill) - self._fill_pos >= _MIN_FREE:
                # Large payload: the kernel copies it into its final buffer.
                self._direct = True
                return fill[self._fill_pos :]
        elif self._skip >= _MIN_FREE:
            scratch = self._scratch
            if scratch is None:
                scratch = self._scratch = memoryview(bytearray(_RBUF_SIZE))
            self._direct = True
            return scratch[: self._skip]
        if len(self._rbuf) - self._rend < _MIN_FREE:
            self._make_room()
        if self._streaming:
            # Large writes follow each other: read little past the next header, so
            # that the next payload goes straight into its own buffer instead of
            # being copied there from the receive buffer.
            self._streaming = False
            return self._rview[self._rend : self._rend + _MIN_FREE]
        return self._rview[self._rend :]

    def _run_parser(self) -> None:
        """Parse with replies corked, then send the whole batch at once."""
        self._corked = True
        try:
            self._parse()
        except Exception:
            log.exception("NBD connection %s: internal error, disconnecting", self._peer)
            self._hard_close()
        finally:
            if not self._deferred:
                self._corked = False
                if self._out:
                    self._flush()

    def _defer(self) -> None:
        """Cork until the end of this turn of the event loop."""
        self._corked = self._deferred = True
        self._loop.call_soon(self._flush_deferred)

    def _flush_deferred(self) -> None:
        self._corked = self._deferred = False
        if self._out:
            self._flush()

    def _make_room(self) -> None:
        """Give the receive buffer room at its end, keeping the unparsed bytes."""
        start = self._rstart
        pending = self._rend - start
        if self._pinned or pending > start:
            # Never write over bytes a suspended call may still be reading
            # (and never memmove overlapping ranges, which CPython memcpys).
            buf = bytearray(max(_RBUF_SIZE, 2 * pending))
            buf[:pending] = self._rview[start : self._rend]
            self._rbuf = buf
            self._rview = memoryview(buf)
            self._rview_ro = self._rview.toreadonly()
            self._pinned = False
        else:
            self._rbuf[:pending] = self._rview[start : self._rend]
        self._rstart = 0
        self._rend = pending

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last buffer from :meth:`get_buffer`."""
        phase = self._phase
        if phase == _TRANSMISSION:
            if self._direct:
                self._direct = False
                if self._fill is not None:
                    self._fill_pos += nbytes
                    if self._fill_pos < len(self._fill):
                        return
                else:
                    self._skip -= nbytes
                    if self._skip:
                        return
            else:
                self._rend += nbytes
            self._run_parser()
        elif phase == _HANDSHAKE:
            self._hbuf += self._hview[:nbytes]
            self._wake()
            if len(self._hbuf) > _HANDSHAKE_BUFFER and not self._hpaused:
                self._hpaused = True
                self._transport.pause_reading()  # type: ignore[union-attr]

    # ------------------------------------------------------------------
    # Handshake

    def _wake(self) -> None:
        waiter = self._hwaiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _read(self, n: int) -> bytes:
        """Read exactly ``n`` handshake bytes."""
        buf = self._hbuf
        while len(buf) < n:
            if self._eof:
                raise ConnectionClosed("connection closed during handshake")
            if self._hpaused:
                self._hpaused = False
                self._transport.resume_reading()  # type: ignore[union-attr]
            self._hwaiter = self._loop.create_future()
            try:
                await self._hwaiter
            finally:
                self._hwaiter = None
            buf = self._hbuf
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _opt_reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._write(
            proto.OPTION_REPLY.pack(proto.NBD_OPTS_REPLY_MAGIC, option, reply, len(payload))
            + payload
        )

    def _opt_error(self, option: int, reply: int, text: str) -> None:
        self._opt_reply(option, reply, _message(text))

    async def _handshake(self) -> None:
        """Run the handshake, then switch to transmission or close."""
        server = self._server
        try:
            async with asyncio.timeout(server.handshake_timeout):
                go = await self._negotiate()
        except asyncio.CancelledError:
            self._hard_close()
            raise
        except (ConnectionClosed, ConnectionError) as exc:
            log.debug("NBD handshake with %s ended: %s", self._peer, exc)
            self._hard_close()
            return
        except TimeoutError:
            log.info("NBD handshake with %s timed out", self._peer)
            self._hard_close()
            return
        except (ProtocolError, HandshakeError, ssl.SSLError, OSError) as exc:
            log.info("NBD handshake with %s failed: %s", self._peer, exc)
            self._hard_close()
            return
        except Exception:
            log.exception("NBD handshake with %s: internal error", self._peer)
            self._hard_close()
            return
        finally:
            self._handshake_task = None
        if not go:
            self._close()
            return
        if server._closing:
            self._hard_close()
            return
        self._enter_transmission()

    async def _negotiate(self) -> bool:
        """Greeting and option haggling; True once an export was chosen."""
        server = self._server
        self._write(
            proto.NEWSTYLE_GREETING.pack(
                proto.NBDMAGIC,
                proto.IHAVEOPT,
                proto.NBD_FLAG_FIXED_NEWSTYLE | proto.NBD_FLAG_NO_ZEROES,
            )
        )
        (cflags,) = proto.CLIENT_FLAGS.unpack(await self._read(4))
        known = proto.NBD_FLAG_C_FIXED_NEWSTYLE | proto.NBD_FLAG_C_NO_ZEROES
        if cflags & ~known:
            # The spec: the server MUST drop the connection on unknown client flags.
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & proto.NBD_FLAG_C_NO_ZEROES)
        fixed = bool(cflags & proto.NBD_FLAG_C_FIXED_NEWSTYLE)
        if server.tls_required and not fixed:
            raise HandshakeError("TLS is required but the client lacks fixed newstyle")

        while True:
            magic, option, length = proto.OPTION_HEADER.unpack(await self._read(16))
            if magic != proto.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > _MAX_OPTION_DATA:
                raise ProtocolError(f"option {option} data too long ({length} bytes)")
            data = await self._read(length) if length else b""
            log.debug(
                "connection %s: option %s, %d bytes",
                self._peer,
                proto.OPTION_NAMES.get(option, option),
                length,
            )

            if option == proto.NBD_OPT_EXPORT_NAME:
                if server.tls_required and not self._tls_active:
                    # EXPORT_NAME cannot fail politely: the spec says terminate.
                    raise HandshakeError("NBD_OPT_EXPORT_NAME before TLS was negotiated")
                self._export_name(data, no_zeroes)
                return True
            if option == proto.NBD_OPT_ABORT:
                self._opt_reply(option, proto.NBD_REP_ACK)
                return False
            if server.tls_required and not self._tls_active and option != proto.NBD_OPT_STARTTLS:
                self._opt_error(option, proto.NBD_REP_ERR_TLS_REQD, "TLS is required")
                continue
            if option == proto.NBD_OPT_GO or option == proto.NBD_OPT_INFO:
                if self._info_or_go(option, data):
                    return True
            elif option == proto.NBD_OPT_STRUCTURED_REPLY:
                if data:
                    self._opt_error(option, proto.NBD_REP_ERR_INVALID, "unexpected data")
                else:
                    self._structured = True
                    self._opt_reply(option, proto.NBD_REP_ACK)
            elif option == proto.NBD_OPT_LIST:
                self._list(data)
            elif option in (proto.NBD_OPT_LIST_META_CONTEXT, proto.NBD_OPT_SET_META_CONTEXT):
                self._meta_context(option, data)
            elif option == proto.NBD_OPT_STARTTLS:
                await self._starttls(data)
            elif option == proto.NBD_OPT_DROVE_ARENA and server.accept_arena:
                self._accept_arena(option, data)
            else:
                self._opt_error(option, proto.NBD_REP_ERR_UNSUP, f"option {option} unsupported")

    def _accept_arena(self, option: int, data: bytes) -> None:
        """Map the client's arena if it may share it with us (see drove.nbd.arena)."""
        transport = self._transport
        try:
            sock = transport.get_extra_info("socket") if transport is not None else None
            self._arena = arenas.open_peer_arena(sock, data.decode("utf-8"))
        except (OSError, ValueError) as exc:  # PermissionError and UnicodeError included
            log.info("NBD connection %s: arena refused: %s", self._peer, exc)
            self._opt_error(option, proto.NBD_REP_ERR_POLICY, f"arena refused: {exc}")
            return
        self._opt_reply(option, proto.NBD_REP_ACK)

    def _open(self, name: str) -> Export | None:
        """The export called ``name``, None if there is none; ExportRefused passes through."""
        try:
            return self._server.provider.open_export(name)
        except ExportRefused:
            raise
        except Exception:
            log.exception("opening an NBD export failed (%d-byte name)", len(name))
            return None

    def _open_for(self, option: int, name: str) -> Export | None:
        """The export called ``name`` for ``option``; None once the option was answered with
        an error (no such export, or the provider refused it)."""
        try:
            export = self._open(name)
        except ExportRefused as exc:
            # The name may carry a secret (drove.replica.access): the reason says enough.
            log.info("NBD connection %s: export refused: %s", self._peer, exc)
            self._opt_error(option, exc.reply, str(exc))
            if exc.disconnect and option == proto.NBD_OPT_GO:
                # Nothing more to say to this client: the reply goes out, then we close.
                raise HandshakeError(f"export refused: {exc}") from None
            return None
        if export is None:
            self._opt_error(option, proto.NBD_REP_ERR_UNKNOWN, f"no export {name!r}")
        return export

    def _export_name(self, data: bytes, no_zeroes: bool) -> None:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HandshakeError("export name is not UTF-8") from exc
        export = self._open(name)
        if export is None:
            raise HandshakeError(f"no export {name!r}")
        tflags = proto.transmission_flags(export.caps, self._structured)
        reply = proto.EXPORT_NAME_REPLY.pack(export.size, tflags)
        self._write(reply if no_zeroes else reply + proto.EXPORT_NAME_PADDING)
        self._choose(export, name, tflags, block_size_negotiated=False)

    def _info_or_go(self, option: int, data: bytes) -> bool:
        """Answer NBD_OPT_INFO / NBD_OPT_GO; True when GO succeeded."""
        size = len(data)
        if size < 6:
            self._opt_error(option, proto.NBD_REP_ERR_INVALID, "option data too short")
            return False
        (namelen,) = proto.U32.unpack_from(data, 0)
        if namelen > size - 6:
            self._opt_error(option, proto.NBD_REP_ERR_INVALID, "name length too long")
            return False
        (nreq,) = proto.U16.unpack_from(data, 4 + namelen)
        if size != 4 + namelen + 2 + 2 * nreq:
            self._opt_error(option, proto.NBD_REP_ERR_INVALID, "bad information request list")
            return False
        requests = {proto.U16.unpack_from(data, 6 + namelen + 2 * i)[0] for i in range(nreq)}
        try:
            name = data[4 : 4 + namelen].decode("utf-8")
        except UnicodeDecodeError:
            self._opt_error(option, proto.NBD_REP_ERR_INVALID, "export name is not UTF-8")
            return False
        export = self._open_for(option, name)
        if export is None:
            return False
        caps = export.caps
        tflags = proto.transmission_flags(caps, self._structured)
        rep = proto.NBD_REP_INFO
        self._opt_reply(
            option, rep, proto.INFO_EXPORT.pack(proto.NBD_INFO_EXPORT, export.size, tflags)
        )
        if proto.NBD_INFO_NAME in requests:
            self._opt_reply(
                option, rep, proto.INFO_TYPE.pack(proto.NBD_INFO_NAME) + _message(export.name)
            )
        if proto.NBD_INFO_DESCRIPTION in requests and export.description:
            self._opt_reply(
                option,
                rep,
                proto.INFO_TYPE.pack(proto.NBD_INFO_DESCRIPTION) + _message(export.description),
            )
        # Always advertised (the spec allows unrequested info); a client
        # that asked for it is bound by it, the others are still checked.
        self._opt_reply(
            option,
            rep,
            proto.INFO_BLOCK_SIZE.pack(proto.NBD_INFO_BLOCK_SIZE, *block_sizes(caps)),
        )
        self._opt_reply(option, proto.NBD_REP_ACK)
        if option == proto.NBD_OPT_GO:
            self._choose(
                export, name, tflags, block_size_negotiated=proto.NBD_INFO_BLOCK_SIZE in requests
            )
            return True
        return False

    def _list(self, data: bytes) -> None:
        option = proto.NBD_OPT_LIST
        if data:
            self._opt_error(option, proto.NBD_REP_ERR_INVALID, "unexpected data")
            return
        try:
            exports = self._server.provider.list_exports()
        except ExportRefused as exc:
            self._opt_error(option, exc.reply, str(exc))
            return
        except Exception:
            log.exception("listing NBD exports failed")
            self._opt_error(option, proto.NBD_REP_ERR_POLICY, "cannot list exports")
            return
        for name, description in exports:
            raw = _message(name)
            self._opt_reply(
                option,
                proto.NBD_REP_SERVER,
                proto.U32.pack(len(raw)) + raw + _message(description or ""),
            )
        self._opt_reply(option, proto.NBD_REP_ACK)

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == proto.NBD_OPT_SET_META_CONTEXT
        if setting:
            # The spec: SET replaces the previous selection even when it fails.
            self._meta_export = None
            self._meta_selected = False
        if not self._structured:
            self._opt_error(option, proto.NBD_REP_ERR_INVALID, "structured replies not negotiated")
            return
        parsed = self._parse_meta(data)
        if parsed is None:
            self._opt_error(option, proto.NBD_REP_ERR_INVALID, "malformed metadata query")
            return
        name, queries = parsed
        export = self._open_for(option, name)
        if export is None:
            return
        available = export.caps.block_status
        if setting:
            chosen = available and proto.BASE_ALLOCATION in queries
        else:
            # LIST: no query lists everything; "base:" is the namespace wildcard.
            chosen = available and (
                not queries or proto.BASE_ALLOCATION in queries or "base:" in queries
            )
        if chosen:
            ctx_id = _META_CONTEXT_ID if setting else 0
            self._opt_reply(
                option,
                proto.NBD_REP_META_CONTEXT,
                proto.U32.pack(ctx_id) + proto.BASE_ALLOCATION.encode(),
            )
        if setting:
            self._meta_export = name
            self._meta_selected = chosen
        self._opt_reply(option, proto.NBD_REP_ACK)

    @staticmethod
    def _parse_meta(data: bytes) -> tuple[str, list[str]] | None:
        """Parse a meta context option: export name and queries, or None if malformed."""
        try:
            (namelen,) = proto.U32.unpack_from(data, 0)
            pos = 4 + namelen
            if pos + 4 > len(data):
                return None
            name = data[4:pos].decode("utf-8")
            (count,) = proto.U32.unpack_from(data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (qlen,) = proto.U32.unpack_from(data, pos)
                pos += 4
                if pos + qlen > len(data):
                    return None
                queries.append(data[pos : pos + qlen].decode("utf-8"))
                pos += qlen
            if pos != len(data):
                return None
            return name, queries
        except (struct.error, UnicodeDecodeError):
            return None

    async def _starttls(self, data: bytes) -> None:
        option = proto.NBD_OPT_STARTTLS
        ctx = self._server.tls
        if ctx is None:
            self._opt_error(option, proto.NBD_REP_ERR_UNSUP, "TLS is not configured")
            return
        if self._tls_active:
            self._opt_error(option, proto.NBD_REP_ERR_INVALID, "TLS already active")
            return
        if data:
            self._opt_error(option, proto.NBD_REP_ERR_INVALID, "unexpected data")
            return
        if self._hbuf:
            # Bytes after STARTTLS would be the TLS client hello, which the
            # client may only send after our ACK: this client is broken.
            raise ProtocolError("data pipelined after NBD_OPT_STARTTLS")
        self._opt_reply(option, proto.NBD_REP_ACK)
        transport = self._transport
        assert transport is not None
        # No await between the ACK and start_tls: the raw transport is
        # handed to the TLS layer before our protocol could see the hello.
        try:
            new_transport = await self._loop.start_tls(transport, self, ctx, server_side=True)
        except BaseException:
            # The TLS layer never reports connection_lost to a protocol whose
            # handshake failed: close and forget the connection ourselves.
            transport.abort()
            self.connection_lost(None)
            raise
        if new_transport is None:
            self.connection_lost(None)
            raise ConnectionClosed("connection closed during TLS handshake")
        self._transport = new_transport
        new_transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self._tls_active = True
        # The spec: no negotiation state survives STARTTLS.
        self._structured = False
        self._meta_export = None
        self._meta_selected = False

    def _choose(
        self, export: Export, name: str, tflags: int, *, block_size_negotiated: bool
    ) -> None:
        """Fix the export and everything the transmission phase checks per request."""
        caps = export.caps
        self._export = export
        self._export_chosen = name
        self._submit = getattr(export, "submit", None)
        self._size = export.size
        self._tflags = tflags
        self._readonly = caps.readonly
        self._flags_of = [proto.allowed_command_flags(cmd, tflags) for cmd in range(8)]
        self._read_flags = self._flags_of[proto.NBD_CMD_READ]
        self._write_flags = self._flags_of[proto.NBD_CMD_WRITE]
        min_block, _, self._max_block = block_sizes(caps)
        self._min_block = min_block
        self._align = min_block - 1  # a power of two: alignment is a mask test
        # The spec caps CACHE by the maximum block size too, but only a client
        # that asked for the block sizes can know it.
        self._max_other = self._max_block if block_size_negotiated else proto.NBD_MAX_BLOCK_LIMIT
        # A refused write's payload is read and dropped up to this size;
        # beyond it the request is treated as a denial of service.
        self._skip_limit = max(self._max_block, proto.NBD_DOS_THRESHOLD)
        self._block_status_ok = (
            self._structured and self._meta_selected and self._meta_export == name
        )

    def _enter_transmission(self) -> None:
        self._phase = _TRANSMISSION
        leftover = self._hbuf
        self._hbuf = bytearray()
        self._rbuf = bytearray(max(_RBUF_SIZE, 2 * len(leftover)))
        self._rview = memoryview(self._rbuf)
        self._rview_ro = self._rview.toreadonly()
        if self._hpaused:
            self._hpaused = False
            self._transport.resume_reading()  # type: ignore[union-attr]
        log.debug("connection %s entered transmission", self._peer)
        if self._frozen:
            self._frozen = False
            self.freeze()  # a handoff began during the handshake: stop before any request
        if leftover:
            # Requests pipelined right behind the handshake.
            self._rbuf[: len(leftover)] = leftover
            self.buffer_updated(len(leftover))

    # ------------------------------------------------------------------
    # Transmission: parsing

    def _parse(self) -> None:
        """Finish a payload in progress, then start every complete request buffered."""
        buf = self._rview
        pos = self._rstart
        end = self._rend
        fill = self._fill
        if fill is not None:
            fill_pos = self._fill_pos
            take = min(len(fill) - fill_pos, end - pos)
            if take:
                fill[fill_pos : fill_pos + take] = buf[pos : pos + take]
                fill_pos += take
                pos += take
                self._fill_pos = fill_pos
            if fill_pos < len(fill):
                self._consumed(pos)
                return
            self._fill = None
            self._streaming = True
            flags, handle, offset = self._fill_req
            held = self._fill_buf  # an arena slot's read-only view is the data itself
            data = held if type(held) is memoryview else fill.toreadonly()
            self._do_write(flags, handle, offset, data, False, held)
        elif self._skip:
            take = min(self._skip, end - pos)
            self._skip -= take
            pos += take
            if self._skip:
                self._consumed(pos)
                return
        unpack = proto.REQUEST.unpack_from
        request = self._request
        while not self._blocked and end - pos >= _REQ:
            magic, flags, cmd, handle, offset, length = unpack(buf, pos)
            nxt = request(magic, flags, cmd, handle, offset, length, pos + _REQ, end)
            if nxt < 0:
                if nxt == _NEED_MORE:
                    break  # the request stays buffered until its payload arrived
                return  # closing
            pos = nxt
        self._consumed(pos)

    def _consumed(self, pos: int) -> None:
        """Everything before ``pos`` was parsed; rewind an emptied buffer when safe."""
        if pos == self._rend and not self._pinned:
            self._rstart = self._rend = 0
        else:
            self._rstart = pos

    def _request(
        self,
        magic: int,
        flags: int,
        cmd: int,
        handle: int,
        offset: int,
        length: int,
        pos: int,
        end: int,
    ) -> int:
        """Validate and start one request; return where parsing continues.

        ``pos`` is where the request's payload would start in the receive
        buffer and ``end`` where the received bytes end.  Returns
        ``_NEED_MORE`` for a small write whose payload is still incomplete,
        or -1 when the rest of the buffer must not be parsed.
        """
        if magic != proto.NBD_REQUEST_MAGIC:
            log.info("NBD connection %s: bad request magic %#x, disconnecting", self._peer, magic)
            self._hard_close()
            return -1

        if cmd == proto.NBD_CMD_READ:
            # One combined test for the common case; _invalid finds the reason.
            if (
                flags & ~self._read_flags
                or length > self._max_block
                or offset + length > self._size
                or (offset | length) & self._align
                or self._shutdown
            ):
                problem = self._invalid(cmd, flags, offset, length)
                if problem is not None:
                    self._error(handle, problem[0], problem[1])
                    return pos
            if not length:
                self._reply_read(handle, offset, _NO_DATA, 0)
            elif self._submit is not None:
                self._call(eager.READ, None, False, _K_READ, handle, flags, offset, length)
            else:
                coro = self._export.read(offset, length)  # type: ignore[union-attr]
                self._start(coro, _K_READ, handle, flags, offset, length)
            return pos

        if cmd == proto.NBD_CMD_WRITE:
            available = end - pos
            if (
                self._readonly
                or flags & ~self._write_flags
                or length > self._max_block
                or offset + length > self._size
                or (offset | length) & self._align
                or self._shutdown
            ):
                problem = self._invalid(cmd, flags, offset, length)
                if problem is not None:
                    return self._refuse_write(handle, pos, length, end, *problem)
            if available >= length:
                stop = pos + length
                self._do_write(flags, handle, offset, self._rview_ro[pos:stop], True, None)
                return stop
            if length <= _INLINE_MAX:
                return _NEED_MORE
            # A large payload: received straight into a buffer of its own,
            # recycled from an earlier write when possible, because fresh
            # large allocations cost more in page faults than the copy.
            arena = self._server.arena
            slot = arena.take(length) if arena is not None else None
            if slot is not None:
                fill, buf = slot  # buf, the slot's read-only view, goes back when done
            else:
                buf = self._spare
                if buf is not None and len(buf) >= length:
                    self._spare = None
                else:
                    buf = bytearray(length)
                fill = memoryview(buf)[:length]
            fill[:available] = self._rview[pos:end]
            self._fill = fill
            self._fill_buf = buf
            self._fill_pos = available
            self._fill_req = (flags, handle, offset)
            return end

        if (cmd == proto.NBD_CMD_DROVE_WRITE_ARENA or cmd == proto.NBD_CMD_DROVE_READ_ARENA) \
                and self._arena is not None:
            return self._arena_request(cmd, flags, handle, offset, length, pos, end)

        if cmd == proto.NBD_CMD_DISC:
            log.debug("connection %s: NBD_CMD_DISC", self._peer)
            self._disc = True
            self._blocked = True
            self._maybe_finish_disc()
            return -1

        self._other(cmd, flags, handle, offset, length)
        return pos

    def _arena_request(self, cmd: int, flags: int, handle: int, offset: int, length: int,
                       pos: int, end: int) -> int:
        """NBD_CMD_DROVE_WRITE_ARENA / _READ_ARENA: a WRITE or READ with its data in the
        client's arena (drove.nbd.arena), at the u64 offset that is the payload."""
        if end - pos < 8:
            return _NEED_MORE
        (where,) = _U64.unpack_from(self._rview, pos)
        arena = self._arena
        assert arena is not None
        write = cmd == proto.NBD_CMD_DROVE_WRITE_ARENA
        problem = self._invalid(proto.NBD_CMD_WRITE if write else proto.NBD_CMD_READ,
                                flags, offset, length)
        if problem is None and (not length or where + length > len(arena)):
            problem = (proto.NBD_EINVAL, "arena range out of bounds")
        if problem is not None:
            self._error(handle, *problem)
        elif write:
            view = arena[where:where + length].toreadonly()
            self._do_write(flags, handle, offset, view, False, None)
        else:
            coro = self._read_into(offset, arena[where:where + length])
            self._start(coro, _K_OK, handle, flags, offset, 0)
        return pos + 8

    async def _read_into(self, offset: int, view: memoryview) -> None:
        export = self._export
        assert export is not None
        readinto = getattr(export, "readinto", None)
        if readinto is not None:
            await readinto(offset, view)
        else:
            data = await export.read(offset, len(view))
            if len(data) != len(view):
                raise OSError(errno.EIO, "short read from the export")
            view[:] = data

    def _refuse_write(
        self, handle: int, pos: int, length: int, end: int, err: int, text: str
    ) -> int:
        """Answer a refused WRITE and skip its payload; return where parsing continues."""
        if length > self._skip_limit:
            # Reading that much just to discard it would be a denial of service.
            log.info(
                "NBD connection %s: refused WRITE of %d bytes is too large to skip, disconnecting",
                self._peer,
                length,
            )
            self._hard_close()
            return -1
        self._error(handle, err, text)
        if end - pos >= length:
            return pos + length
        self._skip = length - (end - pos)
        return end

    def _invalid(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """Why a request must be refused (NBD error, message), or None if it is valid.

        Following the spec's SHOULDs: an unknown command or flag is
        NBD_EINVAL, any write to a read-only export is NBD_EPERM, writing
        past the end is NBD_ENOSPC while reading, trimming, caching or
        querying past it is NBD_EINVAL, and lengths above the maximum block
        size or off the minimum block size are NBD_EINVAL.
        """
        name = proto.COMMAND_NAMES.get(cmd)
        if name is None or cmd == proto.NBD_CMD_DISC:
            return proto.NBD_EINVAL, f"unknown command {cmd}"
        export = self._export
        assert export is not None
        caps = export.caps
        if self._readonly and cmd in _WRITE_COMMANDS:
            return proto.NBD_EPERM, "the export is read-only"
        if cmd == proto.NBD_CMD_BLOCK_STATUS and not self._block_status_ok:
            return proto.NBD_EINVAL, "no metadata context was negotiated"
        supported = {
            proto.NBD_CMD_FLUSH: caps.flush,
            proto.NBD_CMD_TRIM: caps.trim,
            proto.NBD_CMD_CACHE: caps.cache,
            proto.NBD_CMD_WRITE_ZEROES: caps.zero,
        }.get(cmd, True)
        if not supported:
            return proto.NBD_EINVAL, f"{name} is not supported by this export"
        if flags & ~self._flags_of[cmd]:
            return proto.NBD_EINVAL, f"invalid flags {flags:#x} for {name}"
        if cmd == proto.NBD_CMD_FLUSH:
            if offset or length:
                return proto.NBD_EINVAL, "FLUSH offset and length must be zero"
        else:
            if cmd == proto.NBD_CMD_READ or cmd == proto.NBD_CMD_WRITE:
                limit = self._max_block
            elif cmd == proto.NBD_CMD_CACHE:
                limit = self._max_other
            else:
                # TRIM and BLOCK_STATUS have no maximum.  Nor has WRITE_ZEROES here,
                # though the spec allows one: nbdcopy zeroes whole holes (128 MiB
                # seen) after negotiating block sizes, and qemu-nbd and nbdkit
                # accept that; it carries no payload to bound.
                limit = proto.NBD_MAX_BLOCK_LIMIT
            if length > limit:
                return proto.NBD_EINVAL, f"{name} longer than the maximum block size"
            if cmd == proto.NBD_CMD_BLOCK_STATUS and not length:
                # No valid answer exists: every descriptor is non-empty and,
                # with REQ_ONE, may not exceed the requested length.
                return proto.NBD_EINVAL, "BLOCK_STATUS length must not be zero"
            if offset + length > self._refresh_size():
                if cmd == proto.NBD_CMD_WRITE or cmd == proto.NBD_CMD_WRITE_ZEROES:
                    return proto.NBD_ENOSPC, f"{name} beyond the end of the export"
                return proto.NBD_EINVAL, f"{name} beyond the end of the export"
            if (offset | length) % self._min_block:
                return proto.NBD_EINVAL, f"{name} not aligned to the minimum block size"
        if self._shutdown:
            return proto.NBD_ESHUTDOWN, "the server is shutting down"
        return None

    def _other(self, cmd: int, flags: int, handle: int, offset: int, length: int) -> None:
        """Validate and start the less frequent commands."""
        problem = self._invalid(cmd, flags, offset, length)
        if problem is not None:
            self._error(handle, problem[0], problem[1])
            return
        export = self._export
        assert export is not None
        if cmd == proto.NBD_CMD_FLUSH:
            if self._submit is not None:
                self._call(eager.FLUSH, None, False, _K_OK, handle, flags, 0, 0)
            else:
                self._start(export.flush(), _K_OK, handle, flags, 0, 0)
        elif not length:
            # Zero-length TRIM, WRITE_ZEROES and CACHE: nothing to do, and the
            # export may assume length > 0.  (The spec leaves them unspecified
            # but says the server SHOULD NOT disconnect.)
            self._ok(handle)
        elif cmd == proto.NBD_CMD_TRIM:
            fua = bool(flags & proto.NBD_CMD_FLAG_FUA)
            self._start(export.trim(offset, length, fua), _K_OK, handle, flags, offset, 0)
        elif cmd == proto.NBD_CMD_WRITE_ZEROES:
            coro = export.zero(
                offset,
                length,
                fua=bool(flags & proto.NBD_CMD_FLAG_FUA),
                may_trim=not flags & proto.NBD_CMD_FLAG_NO_HOLE,
                fast=bool(flags & proto.NBD_CMD_FLAG_FAST_ZERO),
            )
            self._start(coro, _K_OK, handle, flags, offset, 0)
        elif cmd == proto.NBD_CMD_CACHE:
            self._start(export.cache(offset, length), _K_OK, handle, flags, offset, 0)
        else:  # NBD_CMD_BLOCK_STATUS
            kind = _K_BLOCK_STATUS_ONE if flags & proto.NBD_CMD_FLAG_REQ_ONE else _K_BLOCK_STATUS
            coro = export.block_status(offset, length)
            self._start(coro, kind, handle, flags, offset, length)

    def _refresh_size(self) -> int:
        """Re-read the export's size (it may have grown since the last request)."""
        self._size = size = self._export.size  # type: ignore[union-attr]
        return size

    def _do_write(
        self,
        flags: int,
        handle: int,
        offset: int,
        payload: memoryview,
        pin: bool,
        recycle: bytearray | memoryview | None,
    ) -> None:
        export = self._export
        assert export is not None
        if not payload:
            self._ok(handle)
            return
        fua = bool(flags & proto.NBD_CMD_FLAG_FUA)
        if self._submit is not None:
            self._call(eager.WRITE, payload, fua, _K_OK, handle, flags, offset, len(payload),
                       pin, recycle)
            return
        coro = export.write(offset, payload, fua)
        self._start(coro, _K_OK, handle, flags, offset, len(payload), pin, recycle)

    def _recycle(self, buf: bytearray | memoryview) -> None:
        """Keep the larger payload buffer for the next large write (or free its slot)."""
        if type(buf) is memoryview:
            self._server.arena.give_back(buf)  # type: ignore[union-attr]
            return
        spare = self._spare
        if spare is None or len(buf) > len(spare):
            self._spare = buf

    # ------------------------------------------------------------------
    # Transmission: running export calls

    def _start(
        self,
        coro: Coroutine[Any, Any, Any],
        kind: int,
        handle: int,
        flags: int,
        offset: int,
        length: int,
        pin: bool = False,
        recycle: bytearray | memoryview | None = None,
    ) -> None:
        """Run the first step of ``coro`` now; continue it in a Task only if it suspends.

        ``pin``: the call holds a view into the receive buffer, which must
        then never be overwritten.  ``recycle``: a payload buffer that may
        be reused once the call completed.
        """
        if type(coro) is not _CoroutineType:
            coro = eager.as_coroutine(coro)
        try:
            first = coro.send(None)
        except StopIteration as stop:
            if recycle is not None:
                self._recycle(recycle)
            self._complete(kind, handle, flags, offset, length, stop.value)
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            if recycle is not None:
                self._recycle(recycle)
            self._fail(handle, flags, exc)
            return
        if pin:
            self._pinned = True
        self._inflight += 1
        self._inflight_bytes += length
        task = self._loop.create_task(
            self._finish(coro, first, kind, handle, flags, offset, length, recycle)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._check_flow()

    def _check_flow(self) -> None:
        """Stop reading once this connection has too much in flight."""
        server = self._server
        if (
            self._inflight >= server.max_inflight_requests
            or self._inflight_bytes >= server.max_inflight_bytes
        ):
            self._update_flow()

    def _call(
        self,
        cmd: int,
        data: Any,
        fua: bool,
        kind: int,
        handle: int,
        flags: int,
        offset: int,
        length: int,
        pin: bool = False,
        recycle: bytearray | memoryview | None = None,
    ) -> None:
        """Submit READ, WRITE or FLUSH to an export with ``submit``; reply on completion.

        The callback-style twin of :meth:`_start`: no coroutine and no Task.
        """
        req = _Submitted(self, kind, handle, flags, offset, length, recycle)
        self._inflight += 1
        self._inflight_bytes += length
        try:
            self._submit(cmd, offset, length, data, fua, req)  # type: ignore[misc]
        except Exception as exc:
            if req.conn is not None:
                req(None, exc)
        if req.conn is not None:  # still running
            if pin:
                self._pinned = True
            self._check_flow()

    def _done(
        self,
        kind: int,
        handle: int,
        flags: int,
        offset: int,
        length: int,
        recycle: bytearray | memoryview | None,
        value: Any,
        exc: BaseException | None,
    ) -> None:
        """Reply to a submitted request and release what it held."""
        if exc is None:
            self._complete(kind, handle, flags, offset, length, value)
            if type(value) is memoryview and self._server.arena is not None \
                    and self._server.arena.offset_of(value) is not None:
                # A read answered in the arena: the slot is free once the reply has
                # left, which the flush that sends it checks; nothing is sent any more
                # once the connection stopped transmitting.
                self._sent_slots.append(value)
                if self._phase != _TRANSMISSION:
                    self._release_sent()
        else:
            self._fail(handle, flags, exc)
        if recycle is not None:
            self._recycle(recycle)
        self._inflight -= 1
        self._inflight_bytes -= length
        if self._blocked:
            self._update_flow()
        if self._disc or self._shutdown:
            self._maybe_finish_disc()

    async def _finish(
        self,
        coro: Any,
        first: Any,
        kind: int,
        handle: int,
        flags: int,
        offset: int,
        length: int,
        recycle: bytearray | memoryview | None,
    ) -> None:
        """Drive a suspended export call to completion and reply."""
        try:
            value = await eager.resume(coro, first)
        except asyncio.CancelledError:
            self._done(kind, handle, flags, offset, length, recycle, None,
                       OSError(errno.ESHUTDOWN, "cancelled"))
            raise
        except Exception as exc:
            self._done(kind, handle, flags, offset, length, recycle, None, exc)
        else:
            self._done(kind, handle, flags, offset, length, recycle, value, None)

    def _complete(
        self, kind: int, handle: int, flags: int, offset: int, length: int, value: Any
    ) -> None:
        if kind == _K_OK:
            self._ok(handle)
        elif kind == _K_READ:
            try:
                size = value.nbytes if type(value) is memoryview else len(value)
            except TypeError:
                size = -1
            if size != length:
                log.error(
                    "NBD export %r returned %d bytes for a read of %d",
                    self._export_name_str(),
                    size,
                    length,
                )
                self._error(handle, proto.NBD_EIO, "short read from the export")
            else:
                self._reply_read(handle, offset, value, length)
        else:
            try:
                self._reply_block_status(handle, offset, length, value, kind == _K_BLOCK_STATUS_ONE)
            except Exception:
                log.exception("NBD export %r: bad block status", self._export_name_str())
                self._error(handle, proto.NBD_EIO, "bad block status from the export")

    def _fail(self, handle: int, flags: int, exc: BaseException) -> None:
        """Answer a request whose export call raised ``exc``."""
        if isinstance(exc, OSError):
            err = proto.nbd_error(exc.errno, flags)
            log.debug("NBD export %r: %s", self._export_name_str(), exc)
            text = exc.strerror or str(exc)
        else:
            err = proto.NBD_EIO
            log.error("NBD export %r raised %r", self._export_name_str(), exc, exc_info=exc)
            text = "internal error"
        self._error(handle, err, text)

    def _export_name_str(self) -> str:
        return getattr(self._export, "name", "?")

    # ------------------------------------------------------------------
    # Transmission: replies

    def _send(self, reply: bytes) -> None:
        """Send (or cork) one reply without payload."""
        if self._corked:
            self._out.append(reply)
            self._out_replies += 1
            if self._out_replies >= _CORK_REPLIES:
                self._flush()
        elif self._phase == _TRANSMISSION:
            self._out.append(reply)
            self._defer()

    def _send_data(self, header: bytes, data: Any, length: int) -> None:
        """Send (or cork) a reply header followed by ``length`` bytes of ``data``."""
        if self._corked:
            out = self._out
            out.append(header)
            out.append(data)
            self._out_bytes += length
            self._out_replies += 1
            if self._out_bytes >= _CORK_LIMIT or self._out_replies >= _CORK_REPLIES:
                self._flush()
        elif self._phase == _TRANSMISSION:
            self._out.append(header)
            self._out.append(data)
            self._out_bytes += length
            self._defer()

    def _flush(self) -> None:
        out = self._out
        self._out = []
        self._out_bytes = 0
        self._out_replies = 0
        transport = self._transport
        if self._phase == _TRANSMISSION and transport is not None and not transport.is_closing():
            transport.writelines(out)
        if self._sent_slots:
            self._release_sent()

    def _release_sent(self) -> None:
        """Give back the arena slots of sent replies once the transport let go of them.

        The transport keeps references to what it could not write at once (also
        while closing), so a slot is reused only when its write buffer is empty:
        checked again every few milliseconds until then.
        """
        if self._out and self._phase == _TRANSMISSION:
            return  # replies still queued here; the next flush comes back
        transport = self._transport
        try:
            pending = transport.get_write_buffer_size() if transport is not None else 0
        except Exception:  # a transport torn down completely holds nothing
            pending = 0
        if pending:
            if self._release_timer is None:
                self._release_timer = self._loop.call_later(0.002, self._release_later)
            return
        arena = self._server.arena
        assert arena is not None
        slots, self._sent_slots = self._sent_slots, []
        for slot in slots:
            arena.give_back(slot)

    def _release_later(self) -> None:
        self._release_timer = None
        if self._sent_slots:
            self._release_sent()

    def _ok(self, handle: int) -> None:
        # A simple reply is valid for every success without payload, even
        # with structured replies negotiated, and it is the shortest.
        self._send(proto.SIMPLE_REPLY.pack(proto.NBD_SIMPLE_REPLY_MAGIC, 0, handle))

    def _reply_read(self, handle: int, offset: int, data: Any, length: int) -> None:
        if self._structured:
            if not length:
                # OFFSET_DATA must carry at least one byte: a zero-length read
                # is answered with a lone NONE chunk.
                self._send(
                    proto.STRUCTURED_REPLY.pack(
                        proto.NBD_STRUCTURED_REPLY_MAGIC,
                        proto.NBD_REPLY_FLAG_DONE,
                        proto.NBD_REPLY_TYPE_NONE,
                        handle,
                        0,
                    )
                )
                return
            # One OFFSET_DATA chunk, flagged DONE: once the export returned
            # the data no error can follow, and DF is satisfied trivially.
            header = proto.OFFSET_DATA_CHUNK.pack(
                proto.NBD_STRUCTURED_REPLY_MAGIC,
                proto.NBD_REPLY_FLAG_DONE,
                proto.NBD_REPLY_TYPE_OFFSET_DATA,
                handle,
                8 + length,
                offset,
            )
        else:
            header = proto.SIMPLE_REPLY.pack(proto.NBD_SIMPLE_REPLY_MAGIC, 0, handle)
        if length:
            self._send_data(header, data, length)
        else:
            self._send(header)

    def _error(self, handle: int, err: int, text: str) -> None:
        """Send an error reply (structured, with the message, when negotiated)."""
        if self._structured:
            msg = _message(text)
            self._send(
                proto.ERROR_CHUNK.pack(
                    proto.NBD_STRUCTURED_REPLY_MAGIC,
                    proto.NBD_REPLY_FLAG_DONE,
                    proto.NBD_REPLY_TYPE_ERROR,
                    handle,
                    6 + len(msg),
                    err,
                    len(msg),
                )
                + msg
            )
        else:
            self._send(proto.SIMPLE_REPLY.pack(proto.NBD_SIMPLE_REPLY_MAGIC, err, handle))

    def _reply_block_status(
        self, handle: int, offset: int, length: int, extents: Sequence[Extent], req_one: bool
    ) -> None:
        """Send one BLOCK_STATUS chunk covering at most ``length`` bytes from ``offset``."""
        descriptors: list[tuple[int, int]] = []
        covered = 0
        for extent in extents or ():
            size = extent.length
            if size <= 0:
                break
            size = min(size, length - covered)
            flags = extent.flags & (proto.NBD_STATE_HOLE | proto.NBD_STATE_ZERO)
            if descriptors and descriptors[-1][1] == flags:
                descriptors[-1] = (descriptors[-1][0] + size, flags)
            else:
                if req_one and descriptors:
                    break
                descriptors.append((size, flags))
            covered += size
            if covered >= length:
                break
        if not descriptors:
            # The spec allows one descriptor with status 0 ("allocated,
            # contents unknown") when the export cannot tell.
            descriptors.append((length, 0))
        body = b"".join(proto.BLOCK_DESCRIPTOR.pack(size, flags) for size, flags in descriptors)
        header = proto.BLOCK_STATUS_CHUNK.pack(
            proto.NBD_STRUCTURED_REPLY_MAGIC,
            proto.NBD_REPLY_FLAG_DONE,
            proto.NBD_REPLY_TYPE_BLOCK_STATUS,
            handle,
            4 + len(body),
            _META_CONTEXT_ID,
        )
        self._send(header + body)

    # ------------------------------------------------------------------
    # Flow control and closing

    def _update_flow(self) -> None:
        """Pause or resume parsing and reading after an in-flight or buffer change."""
        if self._phase != _TRANSMISSION or self._disc:
            return
        server = self._server
        blocked = (
            self._frozen
            or self._write_paused
            or self._inflight >= server.max_inflight_requests
            or self._inflight_bytes >= server.max_inflight_bytes
        )
        if blocked:
            self._blocked = True
            if not self._reading_paused:
                self._reading_paused = True
                self._transport.pause_reading()  # type: ignore[union-attr]
        elif self._blocked and not self._resume_scheduled:
            # Resume from a fresh loop iteration, not from inside a
            # transport callback or an export completion.
            self._resume_scheduled = True
            self._loop.call_soon(self._resume_parsing)

    def _resume_parsing(self) -> None:
        self._resume_scheduled = False
        if self._phase != _TRANSMISSION or self._disc or self._frozen:
            return
        self._blocked = False
        if self._rend > self._rstart:
            # Requests held back while blocked are still in the buffer.
            self._run_parser()
        if not self._blocked and self._reading_paused and self._phase == _TRANSMISSION:
            self._reading_paused = False
            self._transport.resume_reading()  # type: ignore[union-attr]

    def _maybe_finish_disc(self) -> None:
        """After DISC, EOF or a server shutdown: close once nothing is outstanding."""
        if self._inflight == 0 and self._phase == _TRANSMISSION:
            self._close()

    def _close(self) -> None:
        """Flush pending replies and close (TLS is shut down by the transport)."""
        if self._out:
            self._flush()
        self._phase = _CLOSED  # nothing is parsed or sent from here on
        self._blocked = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def _hard_close(self) -> None:
        """Initiate a hard disconnect after a protocol violation or failure."""
        self._blocked = True
        self._close()

    def shutdown(self) -> None:
        """Server shutdown: refuse new requests with ESHUTDOWN, close when idle."""
        self._shutdown = True
        if self._phase == _HANDSHAKE:
            task = self._handshake_task
            if task is not None:
                task.cancel()
            self._hard_close()
        elif self._phase == _TRANSMISSION and self._inflight == 0:
            self._close()

    @property
    def export(self) -> Export | None:
        """The export this connection chose (None during the handshake)."""
        return self._export

    def cut(self) -> None:
        """Drop the connection now and discard every request it has not started.

        Nothing buffered is parsed and nothing more is read: requests still in
        the receive buffer or in the socket are never executed.  Calls already
        running finish, but their replies are not sent.
        """
        self._phase = _CLOSED
        self._blocked = True
        self._rstart = self._rend = 0
        self._skip = 0
        self._out.clear()
        task = self._handshake_task
        if task is not None:
            task.cancel()
        self.abort()

    def abort(self) -> None:
        """Drop the connection at once (after the shutdown grace period)."""
        for task in list(self._tasks):
            task.cancel()
        transport = self._transport
        if transport is not None:
            transport.abort()

    # ------------------------------------------------------------------
    # Handoff to another process (a live engine upgrade: drove.engine.handoff)

    def freeze(self) -> None:
        """Parse no further request and read nothing more; requests started finish.

        The stop falls on a request boundary: a request whose payload is still
        arriving is not started, and goes to the successor with the bytes after it.
        """
        if self._frozen:
            return
        self._frozen = True
        if self._phase != _TRANSMISSION or self._disc:
            return  # a handshake freezes as it ends (_enter_transmission)
        self._blocked = True
        if not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()  # type: ignore[union-attr]

    def thaw(self) -> None:
        """Parse and read again after a handoff that did not happen."""
        if not self._frozen:
            return
        self._frozen = False
        self._update_flow()

    @property
    def in_transmission(self) -> bool:
        """Whether the connection serves requests (its handshake done, not closed)."""
        return self._phase == _TRANSMISSION

    @property
    def drained(self) -> bool:
        """Closed, or frozen in transmission with nothing in flight and every reply sent."""
        if self._phase == _CLOSED:
            return True
        if self._phase != _TRANSMISSION or self._inflight or self._out or self._disc:
            return False
        transport = self._transport
        return transport is None or not transport.get_write_buffer_size()

    def handoff_state(self) -> tuple[dict[str, Any], bytes]:
        """What another process needs to go on with this drained connection: the handshake's
        outcome, and the bytes received but not parsed yet (HandoffRefused when it cannot)."""
        if self._tls_active:
            raise HandoffRefused(
                f"NBD client {self._peer or 'on the unix socket'} uses TLS, whose session "
                "lives in this process's TLS library: a TLS connection cannot be handed over")
        if self._arena is not None:
            raise HandoffRefused(f"NBD client {self._peer} shares a memory arena with this "
                                 "process: it cannot be handed over")
        pending = bytes(self._rview[self._rstart : self._rend])
        if self._fill is not None:
            # A large write whose payload is still arriving: it was never started, so it
            # goes over as it came (header, payload so far), and the successor starts it.
            flags, handle, offset = self._fill_req
            header = proto.REQUEST.pack(proto.NBD_REQUEST_MAGIC, flags, proto.NBD_CMD_WRITE,
                                        handle, offset, len(self._fill))
            pending = header + bytes(self._fill[: self._fill_pos]) + pending
        state = {
            "export": self._export_chosen, "structured": self._structured,
            "block_status": self._block_status_ok, "extended_headers": False, "tls": False,
            "tflags": self._tflags, "min_block": self._min_block, "max_block": self._max_block,
            "max_other": self._max_other, "skip": self._skip,
        }
        return state, pending

    def socket_fd(self) -> int:
        """The connection's socket descriptor (what is passed to a successor)."""
        sock = self._transport.get_extra_info("socket")  # type: ignore[union-attr]
        return sock.fileno()

    def _resume_from(self, state: dict[str, Any], pending: bytes) -> None:
        """Go on with a connection another process negotiated (see :meth:`handoff_state`)."""
        name = state["export"]
        export = self._open(name)
        if export is None:  # NbdServer.adoptable said it exists: a bug if it does not now
            log.error("adopted NBD connection %s: no export %r, disconnecting", self._peer, name)
            self._hard_close()
            return
        self._structured = bool(state["structured"])
        self._meta_selected = bool(state["block_status"])
        self._meta_export = name if self._meta_selected else None
        self._choose(export, name, int(state["tflags"]), block_size_negotiated=True)
        # The client was told these limits, not ours: it is held to exactly them.
        self._min_block = int(state["min_block"])
        self._align = self._min_block - 1
        self._max_block = int(state["max_block"])
        self._max_other = int(state["max_other"])
        self._skip_limit = max(self._max_block, proto.NBD_DOS_THRESHOLD)
        self._skip = int(state["skip"])
        self._hbuf = bytearray(pending)
        self._enter_transmission()


class NbdServer:
    """An NBD server for the exports of ``provider`` on TCP and/or unix sockets."""

    def __init__(
        self,
        provider: ExportProvider,
        *,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        handshake_timeout: float | None = 60.0,
        shutdown_timeout: float = 10.0,
        max_inflight_requests: int = 256,
        max_inflight_bytes: int = 128 * 1024 * 1024,
        arena: arenas.Arena | None = None,
        accept_arena: bool = False,
    ) -> None:
        """Configure the server; nothing listens until ``listen_tcp``/``listen_unix``.

        ``tls_required`` refuses every option but STARTTLS and ABORT before
        TLS (the spec's FORCEDTLS mode).  ``max_inflight_*`` bound the
        suspended export calls of one connection before it stops reading.
        ``arena``: receive large write payloads into its slots (an engine, which
        passes them on to its replicas by offset).  ``accept_arena``: let
        same-host clients share theirs (a replica; see :mod:`drove.nbd.arena`).
        """
        if tls_required and tls is None:
            raise ValueError("tls_required needs a TLS context")
        self.provider = provider
        self.tls = tls
        self.tls_required = tls_required
        self.handshake_timeout = handshake_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_inflight_requests = max(1, max_inflight_requests)
        self.max_inflight_bytes = max(1, max_inflight_bytes)
        self.arena = arena
        self.accept_arena = accept_arena
        self._servers: list[asyncio.base_events.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[_Connection] = set()
        self._closing = False
        self._closed = asyncio.Event()
        self._frozen = False  # handing off to another process: connections start frozen

    @property
    def connections(self) -> int:
        """Number of open client connections."""
        return len(self._connections)

    def cut_connections(self, which: Callable[[Export], bool]) -> int:
        """Cut at once every connection whose export ``which`` selects (see _Connection.cut).

        Used to fence stale writers: their queued requests are discarded unexecuted.
        Returns how many connections were cut.
        """
        cut = 0
        for conn in list(self._connections):
            export = conn.export
            if export is not None and which(export):
                conn.cut()
                cut += 1
        return cut

    def _factory(self) -> _Connection:
        return _Connection(self)

    # ------------------------------------------------------------------
    # Handoff to another process (a live engine upgrade: drove.engine.handoff)

    def freeze(self) -> list[tuple[str, socket.socket]]:
        """Stop accepting and freeze every connection at a request boundary.

        Returns duplicates of the listening sockets, ``("tcp" | "unix", socket)``:
        they keep listening (new clients wait in the backlog) until handed over,
        or until :meth:`thaw` serves them again.
        """
        self._frozen = True
        listeners: list[tuple[str, socket.socket]] = []
        for srv in self._servers:
            for s in srv.sockets:
                kind = "unix" if s.family == socket.AF_UNIX else "tcp"
                listeners.append((kind, socket.socket(fileno=os.dup(s.fileno()))))
            srv.close()
        self._servers.clear()
        for conn in list(self._connections):
            conn.freeze()
        return listeners

    async def drained(self, timeout: float) -> None:
        """Wait until every connection is drained (TimeoutError after ``timeout`` seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            busy = [c for c in self._connections if not c.drained]
            if not busy:
                return
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"{len(busy)} NBD connection(s) still negotiating, running requests or "
                    f"sending replies after {timeout:g} s")
            # Replies leave and handshakes end on the loop: look again shortly.
            await asyncio.sleep(0.002)

    def handoff(self) -> list[tuple[dict[str, Any], bytes, int]]:
        """(state, unparsed bytes, socket descriptor) of every open connection, once drained."""
        return [(*conn.handoff_state(), conn.socket_fd())
                for conn in list(self._connections) if conn.in_transmission]

    async def thaw(self, listeners: list[tuple[str, socket.socket]]) -> None:
        """Serve again after a handoff that did not happen: listen, parse and read."""
        self._frozen = False
        for kind, sock in listeners:
            await self.adopt_listener(kind, sock, record=False)
        for conn in list(self._connections):
            conn.thaw()

    def adoptable(self, state: dict[str, Any]) -> str | None:
        """Why a connection in ``state`` cannot go on here (None: it can).

        Its export must exist and offer everything the client was promised, within
        the block sizes it was told.
        """
        name = state.get("export")
        if state.get("tls") or state.get("extended_headers"):
            return "the connection uses TLS or extended headers, which cannot be adopted"
        try:
            export = self.provider.open_export(name) if isinstance(name, str) else None
        except Exception as exc:
            return f"export {name!r}: {exc}"
        if export is None:
            return f"no export {name!r} here"
        tflags = proto.transmission_flags(export.caps, bool(state.get("structured")))
        missing = int(state.get("tflags", 0)) & ~tflags
        if missing:
            return (f"export {name!r} lacks transmission flags {missing:#x} the client was "
                    "promised")
        if state.get("block_status") and not export.caps.block_status:
            return f"export {name!r} has no block status, which the client negotiated"
        minimum, _, maximum = block_sizes(export.caps)
        if minimum > int(state.get("min_block", 1)) or maximum < int(state.get("max_block", 0)):
            return (f"export {name!r} takes blocks of {minimum}..{maximum} bytes; the client "
                    f"was told {state.get('min_block')}..{state.get('max_block')}")
        return None

    async def adopt_listener(self, kind: str, sock: socket.socket, *,
                             record: bool = True) -> None:
        """Accept on ``sock``, a listening socket another process (or :meth:`freeze`) had."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        if kind == "unix":
            srv = await loop.create_unix_server(self._factory, sock=sock)
            if record:
                self._unix_paths.append(sock.getsockname())
        else:
            srv = await loop.create_server(self._factory, sock=sock)
        self._servers.append(srv)

    async def adopt_connection(self, sock: socket.socket, state: dict[str, Any],
                               pending: bytes) -> None:
        """Go on serving a connection another process negotiated (:meth:`adoptable` first)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: _Connection(self, (state, pending)), sock)

    def release(self) -> None:
        """Let go of every listener and connection another process took over: only this
        process's descriptors close; nothing is sent, nothing unlinked."""
        self._closing = True
        for srv in self._servers:
            srv.close()
        self._servers.clear()
        self._unix_paths.clear()
        for conn in list(self._connections):
            conn.cut()
        self._closed.set()

    async def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0 picks a free port); return the bound address."""
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(self._factory, host, port, reuse_address=True)
        self._servers.append(srv)
        sockname = srv.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def listen_unix(self, path: str | os.PathLike[str]) -> str:
        """Listen on the unix socket ``path`` (a stale socket file is replaced)."""
        path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        loop = asyncio.get_running_loop()
        srv = await loop.create_unix_server(self._factory, path)
        self._servers.append(srv)
        self._unix_paths.append(path)
        return path

    async def close(self) -> None:
        """Stop listening, let in-flight requests finish (bounded), close all connections."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        for srv in self._servers:
            srv.close()
        conns = list(self._connections)
        for conn in conns:
            conn.shutdown()
        waiters = [conn.closed for conn in conns if not conn.closed.done()]
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=self.shutdown_timeout)
            for conn in conns:
                if not conn.closed.done():
                    conn.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._servers.clear()
        self._closed.set()

    async def serve_forever(self) -> None:
        """Wait until :meth:`close` has completed."""
        await self._closed.wait()

    async def __aenter__(self) -> NbdServer:
        """Use the server as ``async with NbdServer(...) as server:``."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the server."""
        await self.close()
