"""A shared payload arena: large writes reach same-host replicas without socket copies.

An engine receives a large write's payload from its client straight into a
slot of this arena, a memfd mapped shared.  A replica on the same host maps the
same memfd (found as ``/proc/<engine pid>/fd/<n>``), and the engine sends it
NBD_CMD_DROVE_WRITE_ARENA: the usual request header plus the slot's offset,
instead of the data.  Large reads work the other way round: the replica reads
into a slot (NBD_CMD_DROVE_READ_ARENA), and the engine replies to its client
from there; the slot is given back once the reply has left for the socket.
For a 1 MiB write to three replicas that saves six copies of the megabyte
through unix sockets (three into the kernel, three out of it), the largest
part of the engine's and the replicas' CPU; a 1 MiB read saves two.

Safety: a write's slot is given back only when the request completed, that
is when every replica acknowledged it or was dropped from the volume.  A
replica that was dropped while a write of its was still queued may later
apply it with other data; it is then ERR, generations keep it out of the
volume, and it rejoins only through a rebuild, which compares and copies every
range (see drove.engine.generation and drove.engine.rebuild).  A read's slot
is written by the replica: if the connection is lost or times out before the
answer, the replica may still write into the slot later, so that slot is
retired rather than risk another request's data (``retire``).  It comes back
only once the replica's process has exited (:class:`PeerProcess`, a pidfd:
a process that is gone has no mapping left to write through).

The server side accepts an arena only on a unix socket, only from the process
at the other end of it (SO_PEERCRED), and only if the path is a drove memfd:
a client can never make a replica read anything but memory the client itself
shared.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import select
import socket
import struct
from typing import Any

SLOT = 1024 * 1024
"""Bytes per slot: writes up to this size use the arena, larger ones go inline."""

MIN_SIZE = 64 * 1024 + 1
"""Smaller reads and writes stay inline: a small write's payload is in the receive
buffer already, and a small copy costs less than a slot."""

log = logging.getLogger(__name__)

MEMFD_NAME = "drove-arena"
_PATH_RE = re.compile(r"/proc/(\d+)/fd/(\d+)")


def _peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of the unix socket ``sock`` (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


class PeerProcess:
    """The process at the other end of a unix socket, held by a pidfd.

    A pid may be reused by an unrelated process; a pidfd names one process and
    becomes readable once it has exited.  If the peer died before the pidfd was
    opened, the pidfd may name a later process with its pid; waiting for that
    one to exit as well is merely late, never unsafe.
    """

    __slots__ = ("fd", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    @classmethod
    def of(cls, sock: socket.socket | None) -> PeerProcess | None:
        """The peer process of the unix socket ``sock``, or None if it cannot be told."""
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        try:
            return cls(_peer_pid(sock))
        except OSError as exc:  # the peer is gone already, or no pidfd support
            log.debug("no pidfd for the peer of %s: %s", sock, exc)
            return None

    def exited(self) -> bool:
        """Whether the process has exited (its memory mappings are gone)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(0))

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)  # unset if pidfd_open failed
        if fd is not None:
            os.close(fd)


class Arena:
    """Fixed-size slots in a shared memfd, handed out for large write payloads and reads."""

    def __init__(self, slots: int = 64) -> None:
        self.size = slots * SLOT
        self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self._mm = mmap.mmap(self.fd, self.size)
        self._view = memoryview(self._mm)
        self._free = list(range(slots - 1, -1, -1))  # a stack: the busiest slots stay warm
        # id(read-only view handed out) -> (its offset, the view).  Holding the view keeps
        # its id from being reused by another object while the slot is out.
        self._out: dict[int, tuple[int, memoryview]] = {}
        self._used: set[int] = set()  # slots written since the last trim
        # Slots given up after a cut-off read, with the process that may still write there.
        self._retired: list[tuple[int, PeerProcess | None]] = []
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"

    def take(self, length: int) -> tuple[memoryview, memoryview] | None:
        """A free slot for ``length`` bytes: (writable view, read-only view), or None."""
        if length > SLOT:
            return None
        if not self._free and (not self._retired or not self.reclaim()):
            return None
        slot = self._free.pop()
        self._used.add(slot)
        offset = slot * SLOT
        buf = self._view[offset:offset + length]
        data = buf.toreadonly()
        self._out[id(data)] = (offset, data)
        return buf, data

    def offset_of(self, data: Any) -> int | None:
        """Where the read-only view ``data`` from :meth:`take` starts, or None if it is not one."""
        held = self._out.get(id(data))
        return None if held is None else held[0]

    def give_back(self, data: memoryview) -> None:
        """Free the slot of ``data`` (the request that used it completed)."""
        offset, _ = self._out.pop(id(data))
        self._free.append(offset // SLOT)

    def retire(self, data: memoryview, writer: PeerProcess | None) -> None:
        """Hand out the slot of ``data`` only after ``writer`` exited (never, if None):
        a replica cut off mid-read may still write into it (see the module's docstring)."""
        offset, _ = self._out.pop(id(data))
        self._retired.append((offset // SLOT, writer))
        log.warning("arena slot at %d retired until replica process %s exits: a read into "
                    "it was cut off", offset, writer.pid if writer is not None else "?")

    def reclaim(self) -> int:
        """Free the retired slots whose writer has exited; return how many."""
        keep = []
        freed = 0
        gone: dict[int, bool] = {}  # id(writer) -> exited: one poll per process
        for slot, writer in self._retired:
            if writer is None:
                keep.append((slot, writer))
                continue
            exited = gone.get(id(writer))
            if exited is None:
                exited = gone[id(writer)] = writer.exited()
            if exited:
                self._free.append(slot)
                freed += 1
            else:
                keep.append((slot, writer))
        if freed:
            self._retired = keep
            log.info("%d retired arena slot(s) reclaimed: their replica process has exited",
                     freed)
        return freed

    @property
    def retired(self) -> int:
        """Slots retired after a cut-off read and not reclaimed yet."""
        return len(self._retired)

    def trim(self) -> None:
        """Return the memory of free slots to the system (called when the process idles).

        Retired slots whose writer has exited are reclaimed first.
        """
        if self._retired:
            self.reclaim()
        busy = {off // SLOT for off, _ in self._out.values()}
        for slot in self._used - busy:
            self._mm.madvise(mmap.MADV_REMOVE, slot * SLOT, SLOT)
        self._used &= busy

    @property
    def in_use(self) -> int:
        """Slots handed out and not given back."""
        return len(self._out)


def open_peer_arena(sock: socket.socket | None, path: str) -> memoryview:
    """Map the arena ``path`` that the peer of the unix socket ``sock`` shares.

    The mapping is writable: reads are answered into it.  It is the client's own
    memory, shared for that purpose.

    Raises PermissionError unless ``path`` is ``/proc/PID/fd/N`` of the peer's
    own process and names a drove memfd; OSError if it cannot be mapped.
    """
    if sock is None or sock.family != socket.AF_UNIX:
        raise PermissionError("an arena is accepted only over a unix socket")
    m = _PATH_RE.fullmatch(path)
    if m is None:
        raise PermissionError(f"not an arena path: {path!r}")
    if int(m.group(1)) != _peer_pid(sock):
        raise PermissionError("the arena must belong to the connecting process")
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        # Checked on our own descriptor: the peer cannot swap the file meanwhile.
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{MEMFD_NAME}"):
            raise PermissionError(f"{path} is not a drove arena")
        size = os.fstat(fd).st_size
        if size <= 0:
            raise OSError("empty arena")
        return memoryview(mmap.mmap(fd, size))
    finally:
        os.close(fd)
