"""Live engine upgrade: a running engine hands its NBD listeners and clients to a successor.

``drove engine serve ... --handoff PATH`` listens on the unix socket PATH (0600,
and only a peer of the same user, by SO_PEERCRED) for a successor started as
``drove engine serve <the same arguments> --epoch E2 --takeover PATH``.  The
successor prepares what touches no replica, connects, and then:

1. it says ``hello`` (volume, E2); the old engine refuses with the reason, or
   takes the structural lock (no snapshot meanwhile), stops accepting, freezes
   every client connection at a request boundary, lets the requests in flight
   finish and their replies leave, flushes its replicas and lets go of them
   (its local replica is closed: the successor opens it; never both);
2. it sends ``handoff``: its listening sockets (NBD TCP and unix, and PATH's),
   every client connection (SCM_RIGHTS) with what the handshake settled and
   the bytes received but not parsed yet (drove.nbd.server.NbdServer.handoff);
3. the successor says ``claiming``, claims E2 on the replicas as any start does
   (the old engine is fenced), announces its addresses (the same NBD ones, its
   own control URL) and says ``committed``; only then does it read the clients;
4. on ``committed`` the old engine lets go of everything and exits 0, with no
   clean-stop work on the replicas (it is fenced; it must not mark anything);
5. if the successor gives up, dies or does not commit within
   :data:`COMMIT_TIMEOUT`, the old engine kills it (the pid SO_PEERCRED gave; a
   pidfd, so no other process is hit) and waits until it is gone, takes its
   replicas back (for E2 if the successor had said ``claiming``: replicas
   accept an equal epoch, and the only other holder is dead; unless the successor
   said, giving up, that it sent no claim), and serves every connection again (event
   ``upgrade-aborted`` with the reason).

The wire is drove.engine.handoff_wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import struct
from typing import Any

from drove.engine.handoff_wire import Channel, Frame, WireError
from drove.engine.volume import Engine, EngineError
from drove.nbd.server import HandoffRefused, NbdServer

log = logging.getLogger("drove.engine")

PROTOCOL = 1
"""The handoff protocol this drove speaks; a hello lists every one the successor speaks,
so that engines of different drove versions (the point of an upgrade) agree on one."""
HELLO_TIMEOUT = 5.0
"""Seconds a successor has to say hello once connected."""
LOCK_TIMEOUT = 10.0
"""Seconds a snapshot, revert or expand under way may delay the handoff before it is refused."""
DRAIN_TIMEOUT = 10.0
"""Seconds the requests in flight have to finish and their replies to leave."""
COMMIT_TIMEOUT = 30.0
"""Seconds the successor has, from the handoff to ``committed``, before it is killed."""
SUCCESSOR_MARGIN = 5.0
"""The successor gives up this much before COMMIT_TIMEOUT, so it never commits too late."""
ABORT_GRACE = 5.0
"""Seconds a successor that gave up has to exit by itself before it is killed."""
ANSWER_TIMEOUT = HELLO_TIMEOUT + LOCK_TIMEOUT + DRAIN_TIMEOUT + 15.0
"""Seconds a successor waits for the old engine's answer (drain and flush included)."""
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class HandoffError(Exception):
    """An upgrade that did not happen; the message says why."""


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket."""
    pid, uid, _ = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def bind_handoff(path: str) -> socket.socket:
    """Listen on the unix socket ``path`` (0600); OSError if an engine listens there."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a socket nobody listens on: left by an engine that died
            else:
                raise OSError(f"--handoff {path}: another engine listens there")
            finally:
                probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # peers are checked by SO_PEERCRED too (the chmod races a peer)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


async def _exited(pidfd: int, timeout: float) -> bool:
    """Whether the process behind ``pidfd`` exits within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(pidfd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


async def stop_successor(pidfd: int, pid: int, grace: float) -> None:
    """Make sure the failed successor is gone: it has ``grace`` seconds to exit by itself
    (to say why), then SIGKILL; wait however long it takes, as it must never write again."""
    if await _exited(pidfd, grace):
        return
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    while not await _exited(pidfd, 10.0):
        log.error("the failed successor engine (pid %d) has not exited 10 s after SIGKILL; "
                  "waiting: it must be gone before this engine writes again", pid)


class HandoffService:
    """The unix socket where a successor engine takes this engine's volume (``--handoff``)."""

    def __init__(self, path: str, engine: Engine, server: NbdServer, *,
                 sock: socket.socket | None = None) -> None:
        self.path = path
        self.engine = engine
        self.server = server
        self._sock = sock  # given: the listener a predecessor handed over
        self._task: asyncio.Task[None] | None = None
        self.committed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        """Done with the successor's pid once it took everything over: time to exit."""

    async def start(self) -> None:
        """Listen (unless the socket was inherited) and serve successors one at a time."""
        if self._sock is None:
            self._sock = bind_handoff(self.path)
        self._sock.setblocking(False)
        self._task = asyncio.ensure_future(self._serve())

    def close(self, unlink: bool = True) -> None:
        """Stop listening (``unlink``: remove the socket file; not once handed over)."""
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while not self.committed.done():
            conn, _ = await loop.sock_accept(self._sock)
            try:
                await self._one(conn)
            except Exception:
                log.exception("volume %s: engine handoff failed", self.engine.name)
            finally:
                conn.close()

    async def _one(self, conn: socket.socket) -> None:
        pid, uid = peer_credentials(conn)
        if uid != os.geteuid():
            log.warning("handoff socket %s: refused pid %d of uid %d (not ours)", self.path,
                        pid, uid)
            return
        channel = Channel(conn)
        try:
            hello = (await channel.recv(HELLO_TIMEOUT)).msg
        except (TimeoutError, ConnectionError, WireError, OSError) as exc:
            log.warning("handoff socket %s: pid %d said no hello: %s", self.path, pid, exc)
            channel.close()
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            await self._refuse(channel, pid, f"cannot watch process {pid}: {exc}")
            return
        try:
            why = self._refusal(hello)
            if why is not None:
                await self._refuse(channel, pid, why)
                return
            lock = self.engine.exclusive()
            try:
                await asyncio.wait_for(lock.acquire(), LOCK_TIMEOUT)
            except TimeoutError:
                await self._refuse(channel, pid, "a snapshot, revert or expand is still running "
                                                 f"after {LOCK_TIMEOUT:g} s")
                return
            try:
                await self._hand_over(channel, pid, pidfd, int(hello["epoch"]))
            finally:
                if not self.committed.done():
                    lock.release()  # after a commit, nothing structural runs here again
        finally:
            os.close(pidfd)
            channel.close()

    def _refusal(self, hello: dict[str, Any]) -> str | None:
        """Why this engine will not hand over to the successor that said ``hello``."""
        engine = self.engine
        offered = hello.get("protocols")
        if hello.get("op") != "hello" or not isinstance(offered, list) or \
                PROTOCOL not in offered:
            return (f"the new engine speaks handoff protocol(s) {offered!r}, this one "
                    f"{PROTOCOL} (op {hello.get('op')!r})")
        if hello.get("volume") != engine.name:
            return f"this engine serves volume {engine.name!r}, not {hello.get('volume')!r}"
        epoch = hello.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            return f"bad epoch {epoch!r}"
        if engine.epoch is None or epoch <= engine.epoch:
            return (f"epoch {epoch} is not above this engine's epoch {engine.epoch}: start the "
                    "new engine with a new epoch (--epoch)")
        if engine.fenced is not None:
            return f"this engine was fenced ({engine.fenced}): nothing to hand over"
        if engine.mirror.faulted is not None:
            return f"volume {engine.name} is faulted ({engine.mirror.faulted})"
        if engine.rebuild is not None and engine.rebuild.running:
            return (f"replica {engine.rebuild.target.name} is rebuilding; upgrade once the "
                    "rebuild is done")
        return None

    async def _refuse(self, channel: Channel, pid: int, why: str) -> None:
        self.engine.event("upgrade-refused", f"upgrade to the engine of pid {pid} refused: {why}",
                          reason=why, successor=pid)
        with contextlib.suppress(OSError):
            await channel.send({"op": "refused", "error": why})

    async def _hand_over(self, channel: Channel, pid: int, pidfd: int, epoch: int) -> None:
        engine, server = self.engine, self.server
        held = engine.epoch
        assert held is not None
        engine.upgrade = {"state": "draining", "successor": pid, "epoch": epoch}
        listeners = server.freeze()
        try:
            await server.drained(DRAIN_TIMEOUT)
            connections = server.handoff()
            await engine.mirror.flush()  # every acknowledged write is on the replicas' disks
        except (TimeoutError, HandoffRefused, OSError) as exc:
            await server.thaw(listeners)
            engine.upgrade = {"state": "refused", "successor": pid, "error": str(exc)}
            await self._refuse(channel, pid, f"cannot hand over: {exc}")
            return
        await engine.suspend(flushed=True)
        engine.upgrade = {"state": "handing-over", "successor": pid, "epoch": epoch}
        blob = bytearray()
        states = []
        for state, pending, _ in connections:
            states.append({**state, "pending": [len(blob), len(pending)]})
            blob += pending
        assert self._sock is not None
        fds = ([s.fileno() for _, s in listeners] + [self._sock.fileno()]
               + [fd for _, _, fd in connections])
        claimed = False
        grace = 0.0  # seconds a failed successor has to exit by itself
        try:
            await channel.send({"op": "handoff", "protocol": PROTOCOL, "volume": engine.name,
                                "epoch": held, "listeners": [{"kind": k} for k, _ in listeners],
                                "connections": states,
                                # limits set live (the command line has none of them)
                                "qos": {"limits": engine.qos.limits.to_json(),
                                        "rebuild_bandwidth": engine.rebuild_bandwidth}},
                               bytes(blob), fds)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + COMMIT_TIMEOUT
            while True:
                frame = await channel.recv(max(0.0, deadline - loop.time()))
                op = frame.msg.get("op")
                if op == "claiming":
                    claimed = True
                    engine.upgrade["state"] = "successor-claiming"
                elif op == "committed":
                    break
                elif op == "abort":
                    grace = ABORT_GRACE
                    # It knows whether it sent a claim: none sent, none can land later.
                    claimed = frame.msg.get("claimed") is not False
                    raise HandoffError(f"the new engine gave up: {frame.msg.get('error')}")
                else:
                    raise WireError(f"unexpected message {op!r}")
        except (TimeoutError, ConnectionError, WireError, HandoffError, OSError) as exc:
            reason = (f"the new engine did not commit within {COMMIT_TIMEOUT:g} s"
                      if isinstance(exc, TimeoutError) else str(exc))
            await stop_successor(pidfd, pid, grace)
            said = channel.received()  # what it sent before it was gone
            for msg in said:
                if msg.get("op") == "claiming":
                    claimed = True
                elif msg.get("op") == "abort":
                    claimed = msg.get("claimed") is not False
            if not any(msg.get("op") == "committed" for msg in said):
                await self._resume(listeners, pid, epoch if claimed else held, reason)
                return
            log.error("volume %s: the new engine (pid %d) committed, then died: %s",
                      engine.name, pid, reason)
        self._committed(listeners, pid, epoch)

    async def _resume(self, listeners: list[tuple[str, socket.socket]], pid: int, epoch: int,
                      reason: str) -> None:
        """Serve again after a failed successor (dead by now), holding ``epoch``."""
        engine = self.engine
        try:
            await engine.resume(epoch)
        except Exception as exc:  # fenced by a third engine, replicas gone: I/O fails (EIO)
            engine.mirror.fault(f"could not take the replicas back after a failed upgrade: "
                                f"{exc}")
            log.exception("volume %s: resuming after a failed upgrade", engine.name)
        await self.server.thaw(listeners)
        engine.upgrade = {"state": "aborted", "successor": pid, "error": reason,
                          "epoch": engine.epoch}
        engine.event("upgrade-aborted", f"the upgrade to the engine of pid {pid} failed "
                                        f"({reason}); this engine serves again at epoch "
                                        f"{engine.epoch}", reason=reason, epoch=engine.epoch,
                     successor=pid)

    def _committed(self, listeners: list[tuple[str, socket.socket]], pid: int,
                   epoch: int) -> None:
        self.engine.upgrade = {"state": "committed", "successor": pid, "epoch": epoch}
        self.engine.event("upgraded", f"volume handed over to the engine of pid {pid} "
                                      f"(epoch {epoch}); exiting", successor=pid, epoch=epoch)
        self.server.release()  # only our descriptors close: the successor has the sockets
        for _, sock in listeners:
            sock.close()
        self.committed.set_result(pid)


# ------------------------------------------------------------------ the successor's side


async def ask_predecessor(path: str, volume: str, epoch: int) -> tuple[Channel, Frame]:
    """Connect to the engine at ``path`` and ask for ``volume``; its handoff frame."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, path)
    except OSError as exc:
        sock.close()
        raise HandoffError(f"--takeover {path}: no engine listens there "
                           f"({exc.strerror or exc})") from None
    channel = Channel(sock)
    try:
        await channel.send({"op": "hello", "protocols": [PROTOCOL], "volume": volume,
                            "epoch": epoch, "pid": os.getpid()})
        frame = await channel.recv(ANSWER_TIMEOUT)
    except (TimeoutError, ConnectionError, WireError, OSError) as exc:
        channel.close()
        raise HandoffError(f"--takeover {path}: the engine there did not answer: "
                           f"{exc or type(exc).__name__}") from None
    op = frame.msg.get("op")
    if op == "handoff" and frame.msg.get("protocol") != PROTOCOL:
        op = f"handoff of protocol {frame.msg.get('protocol')!r}"
    if op != "handoff":
        channel.close()
        for fd in frame.fds:
            os.close(fd)
        why = frame.msg.get("error") if op == "refused" else f"unexpected answer {op!r}"
        raise HandoffError(f"--takeover {path}: the engine there refused the upgrade: {why}")
    return channel, frame


class Inheritance:
    """What a predecessor handed over: its listeners, its handoff socket, its clients."""

    def __init__(self, frame: Frame) -> None:
        msg, fds = frame.msg, frame.fds
        listeners = msg.get("listeners") or []
        conns = msg.get("connections") or []
        if len(fds) != len(listeners) + 1 + len(conns):
            for fd in fds:
                os.close(fd)
            raise HandoffError(f"the old engine sent {len(fds)} descriptors for "
                               f"{len(listeners)} listeners and {len(conns)} connections")
        self.listeners = [(entry["kind"], socket.socket(fileno=fd))
                          for entry, fd in zip(listeners, fds, strict=False)]
        self.handoff_sock: socket.socket | None = socket.socket(fileno=fds[len(listeners)])
        self.qos: dict[str, Any] = msg.get("qos") or {}
        self.connections: list[tuple[dict[str, Any], bytes, socket.socket]] = []
        for state, fd in zip(conns, fds[len(listeners) + 1:], strict=True):
            start, length = state.get("pending", (0, 0))
            self.connections.append((state, frame.blob[start:start + length],
                                     socket.socket(fileno=fd)))

    def apply_qos(self, engine: Engine) -> None:
        """Go on with the QoS limits the old engine had (set live, on no command line)."""
        if not self.qos:
            return
        try:
            engine.set_qos(self.qos.get("limits"), replace=True,
                           rebuild_bandwidth=self.qos.get("rebuild_bandwidth"))
        except EngineError as exc:
            raise HandoffError(f"the old engine's QoS limits do not apply here: {exc}") from None

    def check(self, server: NbdServer) -> None:
        """HandoffError unless ``server`` can go on with every connection."""
        problems = [why for state, _, _ in self.connections
                    if (why := server.adoptable(state)) is not None]
        if problems:
            raise HandoffError(f"this engine cannot serve the old one's clients: "
                               f"{'; '.join(sorted(set(problems)))}")

    def addresses(self, export: str) -> dict[str, Any]:
        """The NBD addresses the listeners serve (what the old engine announced)."""
        addresses: dict[str, Any] = {}
        for kind, sock in self.listeners:
            if kind == "unix":
                addresses["nbd_unix"] = sock.getsockname()
            elif "nbd" not in addresses:
                host, port = sock.getsockname()[:2]
                addresses["nbd"] = f"nbd://{host}:{port}/{export}"
                addresses["nbd_host"], addresses["nbd_port"] = host, port
        return addresses

    async def adopt(self, server: NbdServer) -> None:
        """Serve the clients and listeners (after the commit: the old engine has let go)."""
        for state, pending, sock in self.connections:
            await server.adopt_connection(sock, state, pending)
        for kind, sock in self.listeners:
            await server.adopt_listener(kind, sock)
        self.connections, self.listeners = [], []

    def close(self) -> None:
        """Close every inherited descriptor not adopted (the old engine still has its own)."""
        for _, sock in self.listeners:
            sock.close()
        for _, _, sock in self.connections:
            sock.close()
        if self.handoff_sock is not None:
            self.handoff_sock.close()
            self.handoff_sock = None
        self.listeners, self.connections = [], []


__all__ = ["HandoffError", "HandoffService", "Inheritance", "ask_predecessor", "bind_handoff",
           "stop_successor"]
