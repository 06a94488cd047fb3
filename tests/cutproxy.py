"""A TCP proxy a test can cut (every connection reset, new ones refused) and mend."""

from __future__ import annotations

import contextlib
import socket
import threading


class CutProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``; ``cut()`` makes the upstream vanish."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._up = True
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="cutproxy").start()

    def cut(self) -> None:
        """Reset every connection and refuse new ones until :meth:`mend`."""
        with self._lock:
            self._up = False
            socks, self._open = self._open, set()
        for s in socks:
            _reset(s)

    def mend(self) -> None:
        """Forward again."""
        with self._lock:
            self._up = True

    def close(self) -> None:
        """Stop listening and reset everything."""
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                _reset(conn)
                continue
            try:
                remote = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _reset(conn)
                continue
            remote.settimeout(None)
            with self._lock:
                self._open.update((conn, remote))
            for a, b in ((conn, remote), (remote, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a host that went away would look."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
