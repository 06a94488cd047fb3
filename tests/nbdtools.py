"""Shared helpers for NBD tests: an in-process server thread, client runners,
TLS material and a tiny raw-socket NBD client for malformed traffic."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from drove.nbd import proto
from drove.nbd.export import Export, Extent
from drove.nbd.memory import MemoryExport, MemoryProvider
from drove.nbd.server import NbdServer
from drove.service import new_event_loop

# --- Exports with test behaviour ---------------------------------------------


class DelayedExport(MemoryExport):
    """A memory export whose calls sleep a random 0..``max_delay`` seconds.

    Requests then complete out of order, and the server has to continue
    them in Tasks; ``peak`` records the highest number of concurrent calls.
    """

    def __init__(self, *args: Any, max_delay: float = 0.002, seed: int = 1, **kw: Any) -> None:
        """Create the export; see :class:`MemoryExport` for the other arguments."""
        super().__init__(*args, **kw)
        self.max_delay = max_delay
        self.rng = random.Random(seed)
        self.active = 0
        self.peak = 0
        self.slow_offsets: dict[int, float] = {}  # offset -> fixed delay

    async def _delay(self, offset: int) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            delay = self.slow_offsets.get(offset)
            await asyncio.sleep(self.rng.uniform(0, self.max_delay) if delay is None else delay)
        finally:
            self.active -= 1

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Read after a delay."""
        await self._delay(offset)
        return await super().read(offset, length)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write after a delay."""
        await self._delay(offset)
        await super().write(offset, data, fua)


class FailingExport(MemoryExport):
    """A memory export that raises ``error`` from every call touching ``bad_offset``."""

    def __init__(self, *args: Any, bad_offset: int, error: BaseException, **kw: Any) -> None:
        """Create the export; ``error`` is raised for requests at ``bad_offset``."""
        super().__init__(*args, **kw)
        self.bad_offset = bad_offset
        self.error = error

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Read, or fail at the bad offset."""
        if offset == self.bad_offset:
            raise self.error
        return await super().read(offset, length)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write, or fail at the bad offset."""
        if offset == self.bad_offset:
            raise self.error
        await super().write(offset, data, fua)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Block status, or fail at the bad offset."""
        if offset == self.bad_offset:
            raise self.error
        return await super().block_status(offset, length)


class CountingProvider(MemoryProvider):
    """A memory provider that counts how often each export was opened."""

    def __init__(self, exports: Iterable[Export] = (), default: str | None = None) -> None:
        """Serve ``exports`` and count ``open_export`` calls per name."""
        super().__init__(exports, default)
        self.opened: dict[str, int] = {}

    def open_export(self, name: str) -> Export | None:
        """Open and count."""
        self.opened[name] = self.opened.get(name, 0) + 1
        return super().open_export(name)


# --- The in-process server ------------------------------------------------------


class ServerThread:
    """An :class:`NbdServer` running on its own event loop in a daemon thread.

    Clients run as subprocesses; the test reads the exports' memory directly.
    """

    def __init__(
        self,
        provider: MemoryProvider,
        *,
        unix_path: str | os.PathLike[str] | None = None,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = new_event_loop,
        **server_kw: Any,
    ) -> None:
        """Prepare a server for ``provider``; ``server_kw`` goes to :class:`NbdServer`.

        ``loop_factory`` defaults to uvloop (when installed), like production.
        """
        self.provider = provider
        self.loop_factory = loop_factory
        self.unix_path = os.fspath(unix_path) if unix_path else None
        self.server_kw = server_kw
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: NbdServer | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self._thread: threading.Thread | None = None

    def start(self) -> ServerThread:
        """Start the loop thread and the listeners; return self."""
        ready: Future[None] = Future()
        self.loop = self.loop_factory()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self._listen())  # type: ignore[union-attr]
            except BaseException as exc:
                ready.set_exception(exc)
                return
            ready.set_result(None)
            self.loop.run_forever()  # type: ignore[union-attr]

        self._thread = threading.Thread(target=main, name="nbd-server", daemon=True)
        self._thread.start()
        ready.result(timeout=10)
        return self

    async def _listen(self) -> None:
        self.server = NbdServer(self.provider, **self.server_kw)
        self.host, self.port = await self.server.listen_tcp("127.0.0.1", 0)
        if self.unix_path:
            await self.server.listen_unix(self.unix_path)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10) -> Any:
        """Run ``fn(*args)`` (a coroutine function or plain callable) on the server loop."""
        assert self.loop is not None

        async def wrapper() -> Any:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def stop(self) -> None:
        """Close the server and stop the loop thread."""
        if self.loop is None or self._thread is None:
            return
        if self.server is not None:
            self.call(self.server.close, timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self.loop = None

    def __enter__(self) -> ServerThread:
        """Start on entering a ``with`` block."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop on leaving a ``with`` block."""
        self.stop()

    @property
    def connections(self) -> int:
        """Open connections right now."""
        assert self.server is not None
        return self.call(lambda: self.server.connections)  # type: ignore[union-attr]

    def uri(self, name: str = "", *, scheme: str = "nbd", query: str = "") -> str:
        """The TCP NBD URI of export ``name``."""
        uri = f"{scheme}://{self.host}:{self.port}/{name}"
        return f"{uri}?{query}" if query else uri

    def unix_uri(self, name: str = "") -> str:
        """The unix-socket NBD URI of export ``name``."""
        assert self.unix_path is not None
        return f"nbd+unix:///{name}?socket={self.unix_path}"


# --- Running real clients ---------------------------------------------------------


def tool_env() -> dict[str, str]:
    """Environment for client tools: the system python first (nbdsh needs libnbd's module)."""
    env = dict(os.environ)
    env["PATH"] = "/usr/bin:/bin:" + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    env["LC_ALL"] = "C"
    return env


def have(tool: str) -> bool:
    """Whether ``tool`` is on the PATH."""
    return shutil.which(tool, path=tool_env()["PATH"]) is not None


def run(
    args: list[str],
    *,
    timeout: float = 60,
    check: bool = True,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client tool, capture its output, and fail with its stderr when asked."""
    proc = subprocess.run(
        args,
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tool_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args!r} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def nbdsh(script: str, *, timeout: float = 30) -> str:
    """Run a Python ``script`` in nbdsh (``h`` is a fresh handle); return its stdout."""
    return run(["nbdsh", "-c", script], timeout=timeout).stdout


# --- TLS material -------------------------------------------------------------


def make_tls_dir(directory: str | os.PathLike[str]) -> Path:
    """Write a CA, a server and a client certificate in GnuTLS file names.

    The layout (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``,
    ``client-cert.pem``, ``client-key.pem``) is what libnbd's
    ``tls-certificates=DIR`` and qemu's ``tls-creds-x509,dir=DIR`` expect.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(days=1)
    end = now + datetime.timedelta(days=30)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("drove test CA"))
        .issuer_name(name("drove test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    server_cert, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = leaf("drove-client", ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {
        "ca-cert.pem": ca_cert.public_bytes(serialization.Encoding.PEM),
        "server-cert.pem": server_cert,
        "server-key.pem": server_key,
        "client-cert.pem": client_cert,
        "client-key.pem": client_key,
    }
    for fname, content in files.items():
        (path / fname).write_bytes(content)
        os.chmod(path / fname, 0o600)
    return path


def server_tls_context(
    directory: str | os.PathLike[str], *, verify_client: bool = True
) -> ssl.SSLContext:
    """A server-side SSL context from a :func:`make_tls_dir` directory (drove's own builder)."""
    from drove.service import server_tls_context as build

    path = Path(directory)
    ctx = build(str(path / "server-cert.pem"), str(path / "server-key.pem"),
                str(path / "ca-cert.pem"), verify_peer=verify_client)
    if not verify_client:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- A raw-socket client for malformed traffic --------------------------------


class RawClient:
    """A blocking, deliberately naive NBD client that can send anything."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0) -> None:
        """Connect to ``host:port``."""
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.structured = False

    @classmethod
    def unix(cls, path: str | os.PathLike[str], *, timeout: float = 5.0) -> RawClient:
        """Connect to the unix socket ``path`` instead."""
        client = cls.__new__(cls)
        client.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.sock.settimeout(timeout)
        client.sock.connect(os.fspath(path))
        client.structured = False
        return client

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> RawClient:
        """Context manager entry."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close on exit."""
        self.close()

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        """Receive exactly ``n`` bytes or raise ``EOFError``."""
        chunks = []
        while n:
            chunk = self.sock.recv(n)
            if not chunk:
                raise EOFError("server closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (EOF or reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    # Handshake -------------------------------------------------------------

    def greeting(self, client_flags: int = 3) -> int:
        """Read the greeting, send ``client_flags``; return the handshake flags."""
        magic, opt_magic, hflags = proto.NEWSTYLE_GREETING.unpack(self.recv_exact(18))
        assert magic == proto.NBDMAGIC and opt_magic == proto.IHAVEOPT
        self.send(proto.CLIENT_FLAGS.pack(client_flags))
        return hflags

    def option(self, option: int, data: bytes = b"") -> None:
        """Send one option request."""
        self.send(proto.OPTION_HEADER.pack(proto.IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        """Read one option reply: (option, reply type, data)."""
        magic, option, reply, length = proto.OPTION_REPLY.unpack(self.recv_exact(20))
        assert magic == proto.NBD_OPTS_REPLY_MAGIC, hex(magic)
        return option, reply, self.recv_exact(length)

    def go(self, name: str = "", *, structured: bool = False) -> tuple[int, int]:
        """Negotiate (optionally structured replies) and GO; return (size, flags)."""
        if structured:
            self.option(proto.NBD_OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == proto.NBD_REP_ACK
            self.structured = True
        raw = name.encode()
        self.option(proto.NBD_OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = flags = -1
        while True:
            _, reply, data = self.option_reply()
            if reply == proto.NBD_REP_INFO:
                (info,) = struct.unpack_from(">H", data)
                if info == proto.NBD_INFO_EXPORT:
                    _, size, flags = proto.INFO_EXPORT.unpack(data)
            elif reply == proto.NBD_REP_ACK:
                return size, flags
            else:
                raise AssertionError(f"GO failed with reply {reply:#x}: {data!r}")

    def connect(self, name: str = "", *, structured: bool = False) -> tuple[int, int]:
        """Greeting plus GO."""
        self.greeting()
        return self.go(name, structured=structured)

    # Transmission ------------------------------------------------------------

    def request(
        self,
        cmd: int,
        *,
        handle: int = 1,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
        magic: int = proto.NBD_REQUEST_MAGIC,
    ) -> None:
        """Send one request header (and payload)."""
        self.send(proto.REQUEST.pack(magic, flags, cmd, handle, offset, length) + payload)

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """Read one reply: (handle, error, data).

        Simple replies carry ``read_length`` bytes of data on success;
        structured replies are read chunk by chunk until the DONE flag.
        """
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == proto.NBD_SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_length) if error == 0 and read_length else b""
            return handle, error, data
        assert magic == proto.NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
        error = 0
        data = b""
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            if rtype == proto.NBD_REPLY_TYPE_OFFSET_DATA:
                data += payload[8:]
            elif rtype == proto.NBD_REPLY_TYPE_BLOCK_STATUS:
                data += payload
            elif rtype & 0x8000:
                (error,) = struct.unpack_from(">I", payload)
            if flags & proto.NBD_REPLY_FLAG_DONE:
                return handle, error, data
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            assert magic == proto.NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
