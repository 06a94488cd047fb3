"""Running a drove process: an NBD server and a control API on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from drove import __version__
from drove.web import App, HttpServer

log = logging.getLogger("drove")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop where uvloop is installed, else the default one."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


IDLE_HOOKS: list[Callable[[], None]] = []
"""Called with ``malloc_trim`` when the process goes idle: release caches of your own."""


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``main()`` to completion on a fresh (uv)loop, with malloc tuned for I/O buffers.

    While it runs, freed heap memory goes back to the system once the process
    is idle (:func:`release_idle_memory`).
    """
    tuned = tune_malloc()

    async def main_and_trim() -> Any:
        trimmer = asyncio.ensure_future(release_idle_memory()) if tuned else None
        try:
            return await main()
        finally:
            if trimmer is not None:
                trimmer.cancel()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main_and_trim())


def _libc() -> Any:
    """glibc's malloc tunables (mallopt, malloc_trim), or None elsewhere."""
    import ctypes

    for name in (None, "libc.so.6"):
        try:
            libc = ctypes.CDLL(name)
            libc.mallopt  # noqa: B018 - probe: glibc (and not musl's no-op) has both
            libc.malloc_trim  # noqa: B018
        except (OSError, AttributeError):
            continue
        return libc
    return None


def tune_malloc(mmap_threshold: int = 32 * 1024 * 1024) -> bool:
    """Keep large buffers on the malloc heap (glibc only); True if applied.

    Every NBD request of a megabyte allocates a payload-sized buffer (the
    export's read result, a pread, ...).  glibc serves such sizes with a
    fresh mmap, so each request pays hundreds of page faults; measured on
    1 MiB reads that is ~30% of the server's CPU.  A fixed mmap threshold
    and a high trim threshold let freed buffers be reused instead.  This is
    process-wide, so only server entry points call it.

    The cost is memory: after a burst of large requests the heap keeps the
    freed buffers (tens of MiB for qd16 x 1 MiB), so :func:`run` also calls
    :func:`release_idle_memory`, which hands them back once I/O stops.
    """
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, mmap_threshold) == 1
    ok = libc.mallopt(m_trim_threshold, 4 * mmap_threshold) == 1 and ok
    return ok


async def release_idle_memory(interval: float = 2.0, busy: float = 0.05) -> None:
    """Return the heap's free memory to the system whenever the process goes idle (glibc).

    Every ``interval`` seconds, look at the CPU time the process used (all
    threads): above ``busy`` of the interval it is working, and freed buffers
    are kept for reuse (see :func:`tune_malloc`); once an interval after some
    work is quiet, ``malloc_trim(0)`` releases the free pages of every arena.
    A burst of I/O thus leaves no lasting trace in the resident size, and a
    steady load never pays page faults for it.  Runs until cancelled.
    """
    libc = _libc()
    if libc is None:
        return
    last = time.process_time()
    worked = True  # start-up itself leaves free memory behind
    while True:
        await asyncio.sleep(interval)
        now = time.process_time()
        used, last = now - last, now
        if used > busy * interval:
            worked = True
        elif worked:
            for hook in IDLE_HOOKS:
                hook()
            libc.malloc_trim(0)
            worked = False
            last = time.process_time()  # the trim's own CPU time is not work


def server_tls_context(cert: str, key: str, ca: str | None = None,
                       verify_peer: bool = True) -> ssl.SSLContext:
    """A TLS (>= 1.2) server context; with ``ca``, client certificates are checked against it.

    With ``verify_peer`` a client must present one; without, one is optional.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_OPTIONAL
    return ctx


class ControlServer:
    """Serves an API app on an already-bound socket inside the running loop.

    A :class:`drove.web.App` (the replica's and the engine's control APIs) is
    served by :class:`drove.web.HttpServer`, which no client can stall: a
    connection cap, per-route body limits, read and write timeouts, and a
    :meth:`stop` that returns within :data:`drove.web.SHUTDOWN_GRACE` (see
    drove.web).  Any other ASGI app (the manager's FastAPI one) is served by
    uvicorn, imported only then.
    """

    def __init__(self, app: Any, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.address = self.sock.getsockname()[:2]
        if isinstance(app, App):
            self._server: Any = HttpServer(app, self.sock)
        else:
            self._server = _uvicorn_server(app)
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        """Base URL of the API."""
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    async def start(self) -> None:
        """Start serving in the background and wait until it accepts connections."""
        if isinstance(self._server, HttpServer):
            await self._server.start()
            return
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving: idle connections close at once, running requests get a grace."""
        if isinstance(self._server, HttpServer):
            await self._server.stop()
            self.sock.close()
            return
        self._server.should_exit = True
        if self._task:
            await self._task


def _uvicorn_server(app: Any) -> Any:
    """A uvicorn server for ``app`` without its own signal handling (the process owns it)."""
    import uvicorn

    class QuietUvicorn(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    return QuietUvicorn(config)


def print_ready(addresses: dict[str, Any]) -> None:
    """Announce the bound addresses as one JSON line on stdout (scripts and tests read it),
    with the drove version this process runs (an agent upgrades older engines)."""
    sys.stdout.write(json.dumps({"ready": True, "version": __version__, **addresses}) + "\n")
    sys.stdout.flush()


async def wait_for_signal(*signals: int) -> int:
    """Wait until one of ``signals`` arrives and return it."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[int] = loop.create_future()
    for sig in signals:
        loop.add_signal_handler(sig, lambda s=sig: got.done() or got.set_result(s))
    try:
        return await got
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def default_signals() -> int:
    """Wait for SIGTERM or SIGINT."""
    return await wait_for_signal(signal.SIGTERM, signal.SIGINT)


async def armed(stop: Callable[[], Awaitable[int]]) -> asyncio.Future[int]:
    """Start waiting for ``stop`` now; the wait to await once serving.

    A process announces itself ready only after its signal handlers are in:
    a SIGTERM sent the moment the ready line appears must stop it cleanly
    (flush, mark clean), not kill it with the default action.
    """
    waiting = asyncio.ensure_future(stop())
    await asyncio.sleep(0)  # one step: wait_for_signal installs its handlers synchronously
    return waiting


async def listen_nbd(server: Any, nbd: tuple[str, int] | None, unix: str | None,
                     export: str = "") -> dict[str, Any]:
    """Start ``server`` listening on TCP and/or a unix socket; the addresses to announce."""
    addresses: dict[str, Any] = {}
    if nbd is not None:
        host, port = await server.listen_tcp(*nbd)
        addresses["nbd"] = f"nbd://{host}:{port}" + (f"/{export}" if export else "")
        addresses["nbd_host"], addresses["nbd_port"] = host, port
    if unix is not None:
        await server.listen_unix(unix)
        addresses["nbd_unix"] = unix
    return addresses
