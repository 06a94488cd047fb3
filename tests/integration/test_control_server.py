"""Real replica and engine processes against control clients that stall, flood or send garbage.

drove.web's guarantees (tests/unit/test_web.py checks each on its own) hold in the
processes that matter: no client delays a SIGTERM, malformed and oversized requests
are refused, and a flood of idle connections neither grows the replica nor stops the
volume from serving.
"""

from __future__ import annotations

import json
import resource
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from drove.agent.processes import rss_bytes
from drove.web import MAX_CONNECTIONS
from replicatools import ReplicaProc, nbdsh

MiB = 1 << 20


def connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    """A TCP connection to a control URL (``rcvbuf``: a small receive window)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    if rcvbuf is not None:  # before connecting, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    try:
        while chunk := sock.recv(1 << 20):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def exchange(url: str, data: bytes, half_close: bool = False) -> tuple[int, bytes]:
    """Send ``data`` on a new connection: the answer's status and body (the server closes)."""
    with connect(url) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = read_all(sock)
    assert out.startswith(b"HTTP/1.1 "), out[:200]
    return int(out[9:12]), out.partition(b"\r\n\r\n")[2]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def sigterm(proc: ReplicaProc) -> float:
    """SIGTERM the process; seconds until it exited (with status 0)."""
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(timeout=60) == 0, proc.log.read_text()[-3000:]
    return time.monotonic() - started


def stall(url: str) -> list[socket.socket]:
    """Connections that stall: idle, half a request's headers, half its body."""
    idle = connect(url)
    head = connect(url)
    head.sendall(b"GET /v1/info HTTP/1.1\r\nhost: x\r\nx-slow:")
    body = connect(url)
    body.sendall(b"POST /v1/snapshots HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 100\r\n\r\n{\"name\": ")
    return [idle, head, body]


def test_stalled_clients_do_not_delay_sigterm_of_a_replica(replicas) -> None:
    r = replicas("r1", "2G")
    head = r.ok("GET", "/v1/info")["head"]
    # 524288 digests (~18 MiB of JSON: more than the kernel's socket buffers take, 4 MiB
    # by default) asked for by a client that never reads them
    stuck = connect(r.control, rcvbuf=4096)
    stuck.sendall(f"GET /v1/layers/{head}/digests?range_size=4096 HTTP/1.1\r\nhost: x\r\n\r\n"
                  .encode())
    assert select.select([stuck], [], [], 30)[0], "no answer started"
    assert stuck.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 200"
    stalled = stall(r.control)
    assert r.ok("GET", "/v1/info")["head"] == head  # others are still served
    took = sigterm(r)
    print(f"replica: SIGTERM -> exit in {took:.2f} s")
    assert took < 5, f"SIGTERM took {took:.1f} s"
    # the non-reader's answer was cut short, and the stalled ones were closed
    out = read_all(stuck)
    length = int(out.partition(b"content-length: ")[2].partition(b"\r\n")[0])
    assert len(out.partition(b"\r\n\r\n")[2]) < length
    for sock in [stuck, *stalled]:
        assert read_all(sock) == b""
        sock.close()


def test_stalled_clients_do_not_delay_sigterm_of_an_engine(cluster) -> None:
    engine = cluster.start(n=2, size="64M")
    stalled = stall(engine.control)
    assert set(engine.modes().values()) == {"RW"}
    took = sigterm(engine)
    print(f"engine: SIGTERM -> exit in {took:.2f} s")
    assert took < 5, f"SIGTERM took {took:.1f} s"
    for sock in stalled:
        assert read_all(sock) == b""
        sock.close()
    # it flushed and marked its replicas clean on the way
    for r in cluster.replicas:
        assert r.ok("GET", "/v1/info")["engine_state"]["clean"] is True


def test_malformed_and_oversized_requests_are_refused(replicas) -> None:
    r = replicas("r1", "64M")
    url = r.control
    chunked = b"PUT /v1/engine-state HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    for data, half_close, status in [
        (chunked + b"zz\r\n{}\r\n0\r\n\r\n", False, 400),  # bad chunk size
        (chunked + b"2\r\n{}XX0\r\n\r\n", False, 400),  # no CRLF after a chunk
        (chunked + b"9\r\n{\"a\": ", True, 400),  # truncated
        (b"GET /v1/info\r\n\r\n", False, 400),  # bad request line
        (b"GET /v1/info HTTP/1.1\r\nhost: x\r\nx: " + b"a" * 70_000 + b"\r\n\r\n", False, 431),
        (b"POST /v1/snapshots HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n", False, 413),
    ]:
        got, body = exchange(url, data, half_close)
        assert got == status, (data[:80], got, body)
        assert json.loads(body)["detail"]
    # the engine's state may be sent with room to spare; the chain refuses it with a reason
    got, body = exchange(url, b"PUT /v1/engine-state HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                              b"content-type: application/json\r\ncontent-length: 80011\r\n\r\n"
                              b'{"x": "' + b"a" * 80_000 + b'"}\r\n')
    assert got == 400 and b"at most 65536" in body, body[:200]
    got, _ = exchange(url, b"PUT /v1/engine-state HTTP/1.1\r\nhost: x\r\n"
                           b"content-length: 200000\r\n\r\n")
    assert got == 413
    # a rebuild's layer tree may be large: megabytes are read and validated, not refused
    resp = r.api("POST", "/v1/rebuild/prepare", json={
        "layers": [{"file": f"volume-snap-{i}.img"} for i in range(80_000)],
        "head_parent": None, "size": 64 * MiB})
    assert resp.status_code in (400, 404, 409, 422), resp.text[:300]
    assert len(resp.request.content) > 2 * MiB
    assert r.ok("GET", "/v1/info")["rebuilding"] is False  # a refused call changed nothing


def test_idle_connection_flood_leaves_the_replica_small_and_serving(cluster) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    engine = cluster.start(n=2, size="64M")
    r = cluster.replicas[0]
    sockets_before = _sockets(r.proc.pid)
    flood = [connect(r.control) for _ in range(500)]
    try:
        # the replica keeps at most MAX_CONNECTIONS: the longest idle gave way to newcomers
        wait_until(lambda: sum(_closed(s) for s in flood) >= 500 - MAX_CONNECTIONS, 10,
                   "the replica to close the connections beyond its cap")
        assert _sockets(r.proc.pid) <= sockets_before + MAX_CONNECTIONS + 1
        rss = rss_bytes(r.proc.pid) or 0
        print(f"replica with 500 idle connections: {rss / MiB:.1f} MiB, "
              f"{_sockets(r.proc.pid) - sockets_before} more sockets")
        assert 0 < rss < 40 * MiB, f"idle replica with 500 connections: {rss / MiB:.1f} MiB"
        # the volume serves: NBD I/O through the engine, the engine's API, and control calls
        # the engine makes to the replica through the flood
        nbdsh(engine.uri(), "h.pwrite(b'x' * 65536, 1048576); h.flush()\n"
                            "assert h.pread(65536, 1048576) == b'x' * 65536")
        engine.ok("POST", "/v1/snapshots", json={"name": "s1"})
        assert set(engine.modes().values()) == {"RW"}
        assert r.ok("GET", "/v1/info")["snapshots"] == 1
    finally:
        for s in flood:
            s.close()


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (without reading from a live one)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def _sockets(pid: int) -> int:
    """Sockets the process holds open."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += fd.readlink().name.startswith("socket:")
        except OSError:
            continue
    return count


def test_sigterm_right_at_the_ready_line_stops_cleanly(cluster) -> None:
    """Signal handlers are in before a process says it is ready: no kill by default action."""
    engine = cluster.start(n=2, size="64M")
    took = sigterm(engine)  # at once: no API call first
    assert took < 5
    for r in cluster.replicas:
        assert r.ok("GET", "/v1/info")["engine_state"]["clean"] is True
    for r in cluster.replicas:
        sigterm(r)
