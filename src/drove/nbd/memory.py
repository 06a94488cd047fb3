"""In-memory exports: the oracle for tests and the baseline export for benchmarks.

Run standalone as ``python -m drove.nbd.memory --size 64M --port 0`` to serve
one memory export; the bound addresses are printed as one JSON line on
stdout, then the server runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import json
import os
import signal
import ssl
import sys
from collections.abc import Iterable

from drove.nbd.export import NBD_STATE_HOLE, NBD_STATE_ZERO, Capabilities, Export, Extent
from drove.units import parse_size

__all__ = ["MemoryExport", "MemoryProvider", "main"]

_HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO
_ZERO_CHUNK = bytes(1024 * 1024)


class MemoryExport:
    """A bytearray-backed :class:`Export` that tracks which blocks were written.

    Block status reports a block as data once any byte of it was written
    (or zeroed with ``may_trim=False``), and as a hole (reading as zeros)
    until then or after a trim / zero that covered the whole block.
    With ``suspend`` every call yields to the event loop once, which makes
    the server take its Task path instead of the eager one (for tests);
    with ``fast_zero=False`` a fast-zero request fails with ENOTSUP.
    """

    def __init__(
        self,
        size: int,
        name: str = "",
        description: str = "",
        *,
        readonly: bool = False,
        caps: Capabilities | None = None,
        block_size: int = 4096,
        suspend: bool = False,
        fast_zero: bool = True,
    ) -> None:
        """Create a zero-filled export of ``size`` bytes."""
        if size < 0:
            raise ValueError("size must not be negative")
        self.name = name
        self.description = description
        base = caps or Capabilities()
        if readonly and not base.readonly:
            base = dataclasses.replace(base, readonly=True)
        self.caps = base
        self.block_size = block_size
        self.suspend = suspend
        self.fast_zero = fast_zero
        self.data = bytearray(size)
        # One byte per block (1 = allocated): bytearray.find scans runs in C.
        self.allocated = bytearray(-(-size // block_size))

    @property
    def size(self) -> int:
        """Size in bytes."""
        return len(self.data)

    def _mark(self, offset: int, length: int, value: int) -> None:
        """Set the allocation of every block touched by the range (value 1) or
        of every block fully inside it (value 0)."""
        bs = self.block_size
        if value:
            first = offset // bs
            last = (offset + length - 1) // bs
        else:
            first = -(-offset // bs)
            end = offset + length
            last = (end // bs if end < len(self.data) else -(-end // bs)) - 1
        if last < first:
            return
        if first == last:
            self.allocated[first] = value
        else:
            self.allocated[first : last + 1] = (b"\x01" if value else b"\x00") * (last - first + 1)

    def _zero(self, offset: int, length: int) -> None:
        data = self.data
        end = offset + length
        while offset < end:
            n = min(end - offset, len(_ZERO_CHUNK))
            data[offset : offset + n] = _ZERO_CHUNK[:n] if n < len(_ZERO_CHUNK) else _ZERO_CHUNK
            offset += n

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Return a copy of ``length`` bytes at ``offset``."""
        if self.suspend:
            await asyncio.sleep(0)
        # A copy, never a view: the server may hold the buffer until it is sent.
        return self.data[offset : offset + length]

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Store ``data`` at ``offset``."""
        if self.suspend:
            await asyncio.sleep(0)
        if self.caps.readonly:
            raise OSError(errno.EPERM, "read-only export")
        n = len(data)
        self.data[offset : offset + n] = data
        bs = self.block_size
        first = offset // bs
        if (offset + n - 1) // bs == first:
            self.allocated[first] = 1
        else:
            self._mark(offset, n, 1)

    async def zero(
        self,
        offset: int,
        length: int,
        fua: bool = False,
        may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        """Zero the range; whole blocks become holes when ``may_trim``."""
        if self.suspend:
            await asyncio.sleep(0)
        if self.caps.readonly:
            raise OSError(errno.EPERM, "read-only export")
        if fast and not self.fast_zero:
            raise OSError(errno.ENOTSUP, "fast zero not supported")
        self._zero(offset, length)
        self._mark(offset, length, 0 if may_trim else 1)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard the range: it reads as zeros, whole blocks become holes."""
        if self.suspend:
            await asyncio.sleep(0)
        if self.caps.readonly:
            raise OSError(errno.EPERM, "read-only export")
        self._zero(offset, length)
        self._mark(offset, length, 0)

    async def flush(self) -> None:
        """Nothing to do: memory is as durable as it gets."""
        if self.suspend:
            await asyncio.sleep(0)

    async def cache(self, offset: int, length: int) -> None:
        """Nothing to prefetch."""
        if self.suspend:
            await asyncio.sleep(0)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Runs of written blocks (flags 0) and holes (HOLE|ZERO) from ``offset``."""
        if self.suspend:
            await asyncio.sleep(0)
        return self.extents(offset, length)

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Synchronous block status over ``[offset, offset + length)`` (default: to the end)."""
        size = len(self.data)
        end = size if length is None else min(size, offset + length)
        bs = self.block_size
        alloc = self.allocated
        out: list[Extent] = []
        pos = offset
        while pos < end:
            block = pos // bs
            state = alloc[block]
            nxt = alloc.find(b"\x00" if state else b"\x01", block)
            run_end = size if nxt < 0 else min(size, nxt * bs)
            stop = min(run_end, end)
            out.append(Extent(stop - pos, 0 if state else _HOLE))
            pos = stop
        return out


class MemoryProvider:
    """An :class:`ExportProvider` over a dict of exports; ``""`` names the default one."""

    def __init__(self, exports: Iterable[Export] = (), default: str | None = None) -> None:
        """Serve ``exports``; the empty name opens ``default`` (or the first export)."""
        self.exports: dict[str, Export] = {}
        self.default = default
        for export in exports:
            self.add(export)

    def add(self, export: Export) -> None:
        """Add (or replace) an export under its name."""
        self.exports[export.name] = export
        if self.default is None:
            self.default = export.name

    def remove(self, name: str) -> None:
        """Remove an export; connected clients keep their reference."""
        self.exports.pop(name, None)
        if self.default == name:
            self.default = next(iter(self.exports), None)

    def list_exports(self) -> list[tuple[str, str]]:
        """(name, description) of every export."""
        return [(e.name, e.description) for e in self.exports.values()]

    def open_export(self, name: str) -> Export | None:
        """The export called ``name``; the empty name is the default export."""
        export = self.exports.get(name)
        if export is None and name == "" and self.default is not None:
            export = self.exports.get(self.default)
        return export


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls_cert:
        return None
    from drove.service import server_tls_context

    return server_tls_context(args.tls_cert, args.tls_key, args.tls_ca,
                              verify_peer=args.tls_verify_peer)


async def _serve(args: argparse.Namespace) -> None:
    from drove.nbd.server import NbdServer

    size = parse_size(args.size)  # drove.units
    exports = [
        MemoryExport(size, name, args.description, readonly=args.readonly, suspend=args.suspend)
        for name in (args.name or [""])
    ]
    provider = MemoryProvider(exports)
    server = NbdServer(provider, tls=_tls_context(args), tls_required=args.tls_required)
    info: dict[str, object] = {
        "pid": os.getpid(),
        "size": size,
        "exports": [e.name for e in exports],
    }
    if args.port is not None:
        host, port = await server.listen_tcp(args.host, args.port)
        info["host"], info["port"] = host, port
    if args.unix:
        info["unix"] = await server.listen_unix(args.unix)
    print(json.dumps(info), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: serve memory exports until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m drove.nbd.memory", description=__doc__)
    parser.add_argument("--size", default="64M", help="export size (K/M/G suffixes)")
    parser.add_argument("--name", action="append", help="export name (repeatable; default '')")
    parser.add_argument("--description", default="drove memory export")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="TCP port (0 picks a free one)")
    parser.add_argument("--unix", help="unix socket path")
    parser.add_argument("--readonly", action="store_true")
    parser.add_argument("--suspend", action="store_true", help="yield once per request")
    parser.add_argument("--tls-cert", help="server certificate (PEM)")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--tls-ca", help="CA to verify client certificates")
    parser.add_argument("--tls-verify-peer", action="store_true", help="require client certs")
    parser.add_argument("--tls-required", action="store_true", help="refuse plain clients")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG on stderr")
    args = parser.parse_args(argv)
    if args.port is None and not args.unix:
        args.port = 0
    if args.tls_required and not args.tls_cert:
        parser.error("--tls-required needs --tls-cert")
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    from drove.service import run

    run(lambda: _serve(args))


if __name__ == "__main__":
    main()
