"""drove.web (the control APIs' HTTP server) and drove.webclient (the engine's HTTP client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from drove import service
from drove.web import MAX_BODY, App, Body, Field, HttpServer, Request, Response, json_response
from drove.web import server as web_server
from drove.webclient import ConnectError, HttpClient, RemoteProtocolError, Timeout


class Conflict(ValueError):
    pass


def make_app(gate: asyncio.Event | None = None) -> App:
    app = App("test", "1")
    app.state = {"slow": 0, "waiting": 0, "hanging": 0, "cancelled": 0}  # type: ignore[attr-defined]

    @app.exception_handler(ValueError)
    def _bad(request: Request, exc: ValueError) -> Response:
        return json_response(400, {"detail": str(exc)})

    @app.exception_handler(Conflict)
    def _conflict(request: Request, exc: Conflict) -> Response:
        return json_response(409, {"detail": str(exc)})

    @app.post("/things", status=201, body=Body("Thing", {
        "name": Field("str", pattern=r"[a-z]{1,8}"),
        "size": Field("int", gt=0),
        "labels": Field("dict[str,str]", default_factory=dict),
        "force": Field("bool", default=False),
        "ranges": Field("list[list[int]]", nullable=True, default=None),
    }))
    async def create(body: Any) -> dict[str, Any]:
        """Make a thing."""
        if body.name == "dup":
            raise Conflict("exists")
        if body.name == "bad":
            raise ValueError("bad name")
        if body.name == "boom":
            raise RuntimeError("boom")
        return vars(body)

    @app.get("/things/{name}", query={"deep": Field("bool", default=False),
                                      "n": Field("int", default=3)})
    async def show(name: str, deep: bool, n: int) -> Any:
        """Show a thing."""
        return None if name == "none" else {"name": name, "deep": deep, "n": n}

    @app.put("/state", body=Body("State"))
    async def state(body: dict[str, Any]) -> dict[str, Any]:
        """Any object."""
        return body

    @app.get("/slow")
    async def slow() -> dict[str, Any]:
        """Answers late."""
        app.state["slow"] += 1
        await asyncio.sleep(0.6)
        return {"ok": True}

    @app.get("/wait")
    async def wait() -> dict[str, Any]:
        """Answers once the gate opens."""
        assert gate is not None
        app.state["waiting"] += 1
        await gate.wait()
        return {"ok": True}

    @app.get("/hang")
    async def hang() -> None:
        """Never answers."""
        app.state["hanging"] += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            app.state["cancelled"] += 1
            raise

    @app.get("/big", raw=True)
    async def big(request: Request) -> Response:
        """8 MiB."""
        return Response(200, b"x" * (8 << 20), {"content-type": "application/octet-stream"})

    @app.post("/hold", body=Body("Held"), max_body=1 << 20)
    async def hold(body: dict[str, Any]) -> dict[str, Any]:
        """Takes up to 1 MiB and holds it until the gate opens."""
        assert gate is not None
        app.state["waiting"] += 1
        await gate.wait()
        return {"size": len(body["blob"])}

    @app.post("/upload", body=Body("Upload"), max_body=1 << 20)
    async def upload(body: dict[str, Any]) -> dict[str, Any]:
        """Takes up to 1 MiB."""
        return {"size": len(body["blob"])}

    return app


def call(app: App, method: str, target: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    resp = asyncio.run(app.handle(method, target, headers or {}, body))
    try:
        return resp.status, json.loads(resp.body) if resp.body else None
    except ValueError:
        return resp.status, resp.body.decode()


def test_routes_validation_and_errors() -> None:
    app = make_app()
    ok = b'{"name": "a", "size": 2.0, "labels": {"k": "v"}, "ranges": [[0, "4096"]]}'
    status, data = call(app, "POST", "/things", ok)
    assert status == 201
    assert data == {"name": "a", "size": 2, "labels": {"k": "v"}, "force": False,
                    "ranges": [[0, 4096]]}
    assert call(app, "GET", "/things/x?deep=yes&n=5") == (200, {"name": "x", "deep": True,
                                                                "n": 5})
    assert call(app, "GET", "/things/none") == (200, None)
    assert call(app, "GET", "/things/a%2Fb")[0] == 404  # decoded before routing
    assert call(app, "GET", "/nope") == (404, {"detail": "Not Found"})
    assert call(app, "DELETE", "/things") == (405, {"detail": "Method Not Allowed"})
    assert call(app, "POST", "/things", b'{"name": "dup", "size": 1}') == (409,
                                                                           {"detail": "exists"})
    assert call(app, "POST", "/things", b'{"name": "bad", "size": 1}')[0] == 400
    assert call(app, "POST", "/things", b'{"name": "boom", "size": 1}') == (
        500, "Internal Server Error")
    for bad in (b'{"size": 1}', b'{"name": "A", "size": 1}', b'{"name": "a", "size": 0}',
                b'{"name": "a", "size": 1.5}', b'{"name": "a", "size": true}',
                b'{"name": 1, "size": 1}', b'{"name": "a", "size": 1, "labels": {"k": 1}}',
                b'{"name": "a", "size": 1, "force": "maybe"}', b'{"name": "a", "size": 1, '
                b'"ranges": [1]}', b"[1]", b"{bad", b"", b"null"):
        status, data = call(app, "POST", "/things", bad)
        assert status == 422, bad
        assert data["detail"] and {"type", "loc", "msg"} <= set(data["detail"][0]), data
    status, data = call(app, "POST", "/things", b'{"name":"a","size":1}',
                        {"content-type": "text/plain"})
    assert status == 422
    assert call(app, "GET", "/things/x?deep=maybe")[0] == 422
    assert call(app, "GET", "/things/x?n=x")[0] == 422
    assert call(app, "PUT", "/state", b'{"a": [1]}') == (200, {"a": [1]})
    assert call(app, "PUT", "/state", b"[1, 2]")[0] == 422
    spec = call(app, "GET", "/openapi.json")[1]
    assert spec["paths"]["/things"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["required"] == ["name", "size"]
    assert "swagger" in call(app, "GET", "/docs")[1]


Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a test's coroutine on uvloop (as drove's processes do) or asyncio's own loop."""
    factory = service.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(coro)

    return run


def serve(app: App, **kw: Any) -> tuple[HttpServer, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return HttpServer(app, sock, **kw), f"http://127.0.0.1:{sock.getsockname()[1]}"


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Wait for ``predicate()`` to hold, checking every few milliseconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


class Peer:
    """A raw TCP client: sends bytes as given, reads only when asked to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str, rcvbuf: int | None = None) -> Peer:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        if rcvbuf is not None:  # before connecting, so the window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        return cls(*await asyncio.open_connection(sock=sock))

    async def send(self, data: bytes, eof: bool = False) -> None:
        self.writer.write(data)
        if eof:
            self.writer.write_eof()
        await self.writer.drain()

    async def read_all(self, timeout: float = 5.0) -> bytes:
        """Everything until the server closes (fails if it does not within ``timeout``)."""
        async with asyncio.timeout(timeout):
            out = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := await self.reader.read(65536):
                    out += chunk
            return out

    def close(self) -> None:
        self.writer.close()


async def exchange(url: str, data: bytes, eof: bool = False) -> bytes:
    """Send ``data`` on a new connection; all the server sends until it closes."""
    peer = await Peer.connect(url)
    try:
        await peer.send(data, eof)
        return await peer.read_all()
    finally:
        peer.close()


def status_of(out: bytes) -> int:
    assert out.startswith(b"HTTP/1.1 "), out[:200]
    return int(out[9:12])


def test_server_and_client(run: Runner) -> None:
    async def main() -> None:
        app = make_app()
        server, url = serve(app)
        await server.start()
        client = HttpClient(url, timeout=0.3)
        try:
            for i in range(3):  # one kept-alive connection
                r = await client.request("POST", "/things", json={"name": "a", "size": i + 1})
                assert r.status_code == 201 and r.json()["size"] == i + 1
            assert client.idle_connections == 1 and server.connections == 1
            r = await client.request("GET", "/things/x", params={"deep": True, "n": 2})
            assert r.json() == {"name": "x", "deep": True, "n": 2}
            r = await client.request("GET", "/nope")
            assert r.status_code == 404 and r.json()["detail"] == "Not Found"
            rs = await asyncio.gather(*(client.request("GET", f"/things/t{i}")
                                        for i in range(10)))
            assert [r.json()["name"] for r in rs] == [f"t{i}" for i in range(10)]
            with pytest.raises(Timeout):
                await client.request("GET", "/slow")
            assert (await client.request("GET", "/slow", timeout=5)).json() == {"ok": True}
            r = await client.request("HEAD", "/things/x")
            assert r.status_code == 200 and r.content == b"" and \
                r.headers["content-length"] == str(len(b'{"name":"x","deep":false,"n":3}'))
            # pipelined, chunked, 100-continue, HTTP/1.0
            out = await exchange(url, b"GET /things/a HTTP/1.1\r\nhost: x\r\n\r\n"
                                      b"GET /things/b HTTP/1.1\r\nhost: x\r\nconnection: close"
                                      b"\r\n\r\n")
            assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b'{"name":"b",'
                                                                      b'"deep":false,"n":3}')
            out = await exchange(url, b"PUT /state HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                                      b"transfer-encoding: chunked\r\n\r\n"
                                      b"3\r\n{\"a\r\n5;ext=1\r\n\": 1}\r\n"
                                      b"0\r\nx-trailer: 1\r\n\r\n")
            assert status_of(out) == 200 and out.endswith(b'{"a":1}')
            out = await exchange(url, b"PUT /state HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                                      b"connection: close\r\ncontent-length: 2\r\n\r\n{}")
            assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
            out = await exchange(url, b"GET /things/a HTTP/1.0\r\n\r\n")
            assert b"connection: close" in out.lower() and out.endswith(b'"n":3}')
            # a request running when the server stops is answered, and its connection closed
            slow = asyncio.ensure_future(client.request("GET", "/slow", timeout=5))
            await until(lambda: app.state["slow"] == 3)
            await server.stop()
            r = await slow
            assert r.status_code == 200 and r.headers["connection"] == "close"
            assert server.connections == 0
            with pytest.raises(ConnectError):
                await HttpClient(url).request("GET", "/things/a")
        finally:
            await client.aclose()
            await server.stop()

    run(main())


CHUNKED = b"PUT /state HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("data, eof, status", [
    (b"HELLO\r\n\r\n", False, 400),  # bad request line
    (b"GET /things/a HTTP/1.1 extra\r\nhost: x\r\n\r\n", False, 400),
    (b"GET /things/a HTTP/1.1\r\n\r\n", False, 400),  # HTTP/1.1 without host
    (b"GET /things/a HTTP/1.1\r\nhost: x\r\nno colon\r\n\r\n", False, 400),
    (b"GET /things/a HTTP/1.1\r\nhost: x\r\nx: " + b"a" * 70000 + b"\r\n\r\n", False, 431),
    (CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n", False, 400),  # bad chunk size
    (CHUNKED + b"-2\r\n{}\r\n0\r\n\r\n", False, 400),
    (CHUNKED + b"2\r\n{}XX0\r\n\r\n", False, 400),  # no CRLF after the chunk's data
    (CHUNKED + b"5\r\n{\"a", True, 400),  # truncated in a chunk
    (CHUNKED + b"2\r\n{}\r\n", True, 400),  # no last chunk
    (b"PUT /state HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{}", True, 400),
    (b"PUT /state HTTP/1.1\r\nhost: x\r\ncontent-length: ten\r\n\r\n", False, 400),
    (b"PUT /state HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
     False, 400),
    (b"PUT /state HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n", False, 501),
    (b"PUT /state HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999999\r\n\r\n", False, 413),
    (b"PUT /state HTTP/1.1\r\nhost: x\r\ncontent-length: 65537\r\n\r\n", False, 413),
    (CHUNKED + b"8000\r\n" + b" " * 0x8000 + b"\r\n" + b"8001\r\n" + b" " * 0x8001, False, 413),
])
def test_malformed_requests_are_refused_and_closed(data: bytes, eof: bool, status: int,
                                                   run: Runner) -> None:
    async def main() -> None:
        server, url = serve(make_app())
        await server.start()
        try:
            out = await exchange(url, data, eof)  # read_all: the server closes the connection
            assert status_of(out) == status, out
            assert b"connection: close" in out.lower()
            assert json.loads(out.partition(b"\r\n\r\n")[2])["detail"]
            # and the server still answers
            out = await exchange(url, b"GET /things/a HTTP/1.0\r\n\r\n")
            assert status_of(out) == 200
        finally:
            await server.stop()

    run(main())


def test_route_body_limits(run: Runner) -> None:
    async def main() -> None:
        app = make_app()
        assert app.body_limit("PUT", "/state") == MAX_BODY
        assert app.body_limit("POST", "/upload?x=1") == 1 << 20
        assert app.body_limit("POST", "/nowhere") == MAX_BODY
        server, url = serve(app)
        await server.start()
        client = HttpClient(url)
        try:
            big = {"blob": "x" * 200_000}  # over the default, within /upload's own limit
            r = await client.request("POST", "/upload", json=big)
            assert r.status_code == 200 and r.json() == {"size": 200_000}
            r = await client.request("PUT", "/state", json=big)
            assert r.status_code == 413 and r.json() == {"detail": "Request body too large"}
            body = json.dumps(big).encode()
            out = await exchange(url, b"POST /upload HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                                      b"transfer-encoding: chunked\r\n\r\n"
                                      + b"".join(b"%x\r\n%s\r\n" % (len(body[k:k + 5000]),
                                                                    body[k:k + 5000])
                                                 for k in range(0, len(body), 5000))
                                      + b"0\r\n\r\n")
            assert status_of(out) == 200
            # too large by its Content-Length: refused before the body is asked for
            peer = await Peer.connect(url)
            await peer.send(b"POST /upload HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                            b"content-length: 2000000\r\n\r\n")
            out = await peer.read_all()
            peer.close()
            assert status_of(out) == 413 and b"100 Continue" not in out
            # the ASGI entry keeps the limits too
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b" " * 40_000, "more_body": True}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app({"type": "http", "method": "PUT", "path": "/state", "headers": []},
                      receive, send)
            assert sent[0]["status"] == 413
        finally:
            await client.aclose()
            await server.stop()

    run(main())


def test_bodies_held_at_once_are_bounded(monkeypatch: pytest.MonkeyPatch, run: Runner) -> None:
    monkeypatch.setattr(web_server, "MAX_BUFFERED", 150_000)

    async def main() -> None:
        gate = asyncio.Event()
        app = make_app(gate)
        server, url = serve(app)
        await server.start()
        blob = {"blob": "x" * 80_000}
        try:
            held = asyncio.ensure_future(HttpClient(url).request("POST", "/hold", json=blob))
            await until(lambda: app.state["waiting"] == 1)
            r = await HttpClient(url).request("POST", "/upload", json=blob)  # by its length
            assert r.status_code == 503 and "in flight" in r.json()["detail"]
            body = json.dumps(blob).encode()
            out = await exchange(url, b"POST /upload HTTP/1.1\r\nhost: x\r\n"
                                      b"transfer-encoding: chunked\r\n\r\n"
                                      + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            assert status_of(out) == 503  # while it arrives
            r = await HttpClient(url).request("POST", "/upload", json={"blob": "small"})
            assert r.status_code == 200
            gate.set()
            assert (await held).json() == {"size": 80_000}
            r = await HttpClient(url).request("POST", "/upload", json=blob)  # released
            assert r.json() == {"size": 80_000}
        finally:
            await server.stop()

    run(main())


def test_connection_cap_closes_the_longest_idle_then_refuses(run: Runner) -> None:
    async def main() -> None:
        gate = asyncio.Event()
        app = make_app(gate)
        server, url = serve(app, max_connections=4)
        await server.start()
        peers: list[Peer] = []
        try:
            for _ in range(4):
                peers.append(await Peer.connect(url))
                await until(lambda: server.connections == len(peers))
            client = HttpClient(url)
            r = await client.request("GET", "/things/a")  # the oldest idle one gave way
            assert r.status_code == 200
            assert await peers[0].read_all() == b""
            assert server.connections == 4
            await client.aclose()
            # four requests running: a fifth connection is answered 503 and closed
            waiting = [asyncio.ensure_future(HttpClient(url).request("GET", "/wait"))
                       for _ in range(4)]
            await until(lambda: app.state["waiting"] == 4)
            out = await exchange(url, b"GET /things/a HTTP/1.1\r\nhost: x\r\n\r\n")
            assert status_of(out) == 503 and b"Too many connections" in out
            gate.set()
            assert [(await w).status_code for w in waiting] == [200] * 4
        finally:
            for peer in peers:
                peer.close()
            await server.stop()

    run(main())


def test_timeouts_close_stalled_connections(monkeypatch: pytest.MonkeyPatch, run: Runner) -> None:
    for name in ("KEEP_ALIVE", "HEADER_TIMEOUT", "BODY_TIMEOUT", "WRITE_TIMEOUT"):
        monkeypatch.setattr(web_server, name, 0.3)

    async def main() -> None:
        server, url = serve(make_app())
        await server.start()
        try:
            idle = await Peer.connect(url)
            kept = await Peer.connect(url)
            await kept.send(b"GET /things/a HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await Peer.connect(url)
            await head.send(b"GET /things/a HTTP/1.1\r\nhost:")
            body = await Peer.connect(url)
            await body.send(b"PUT /state HTTP/1.1\r\nhost: x\r\ncontent-length: 9\r\n\r\n{")
            assert await idle.read_all(3) == b""
            assert status_of(await kept.read_all(3)) == 200  # answered, then idle: closed
            assert await head.read_all(3) == b""
            assert await body.read_all(3) == b""
            # headers dribbled a byte at a time still must be complete in time
            loris = await Peer.connect(url)
            started = time.monotonic()
            with pytest.raises(ConnectionError):
                for byte in b"GET /things/a HTTP/1.1\r\nhost: x\r\nx: " + b"a" * 1000:
                    await loris.send(bytes([byte]))
                    await asyncio.sleep(0.05)  # pacing the sender, not synchronising
            assert time.monotonic() - started < 3
            # a client that does not read a large answer is cut
            for peer in (idle, kept, head, body, loris):
                peer.close()
            await until(lambda: server.connections == 0)
            stuck = await Peer.connect(url, rcvbuf=4096)
            await stuck.send(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
            await until(lambda: server.connections == 1)
            await until(lambda: server.connections == 0)
            stuck.close()
        finally:
            await server.stop()

    run(main())


def test_stop_is_bounded(monkeypatch: pytest.MonkeyPatch, run: Runner) -> None:
    monkeypatch.setattr(web_server, "SHUTDOWN_GRACE", 1.5)

    async def main() -> None:
        gate = asyncio.Event()
        app = make_app(gate)
        server, url = serve(app)
        await server.start()
        idle = await Peer.connect(url)
        half = await Peer.connect(url)
        await half.send(b"PUT /state HTTP/1.1\r\nhost: x\r\ncontent-length: 9\r\n\r\n{")
        stuck = await Peer.connect(url, rcvbuf=4096)
        await stuck.send(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        assert await stuck.reader.readexactly(12) == b"HTTP/1.1 200"  # then it stops reading
        finishing = asyncio.ensure_future(HttpClient(url).request("GET", "/wait", timeout=10))
        hanging = asyncio.ensure_future(HttpClient(url).request("GET", "/hang", timeout=10))
        await until(lambda: app.state["waiting"] == 1 and app.state["hanging"] == 1)
        started = time.monotonic()
        stopping = asyncio.ensure_future(server.stop())
        # idle and half-sent requests are closed at once, well within the grace
        assert await idle.read_all(1.0) == b""
        assert await half.read_all(1.0) == b""
        gate.set()  # a running request that ends within the grace is answered
        r = await finishing
        assert r.status_code == 200 and r.headers["connection"] == "close"
        await stopping
        took = time.monotonic() - started
        assert 1.4 < took < 3.0, took  # /hang and the non-reader held it the whole grace
        with pytest.raises(RemoteProtocolError):
            await hanging  # cut, its handler cancelled
        assert app.state["cancelled"] == 1
        assert server.connections == 0
        out = await stuck.read_all()  # what the kernel had taken, then the end
        assert 0 < len(out) < 8 << 20  # the non-reader's answer was cut short
        for peer in (idle, half, stuck):
            peer.close()

    run(main())


def test_client_retries_when_a_reused_connection_was_closed(run: Runner) -> None:
    """A server may close an idle connection as the next request goes out: sent again."""
    async def main() -> None:
        seen: list[tuple[int, bytes]] = []

        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            n = len({c for c, _ in seen})
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                seen.append((n, head.split(b" ")[1]))
                if n == 0 and len(seen) == 2:
                    break  # close the kept-alive connection instead of answering
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            writer.close()

        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        client = HttpClient(f"http://127.0.0.1:{port}")
        try:
            assert (await client.request("POST", "/one")).content == b"ok"
            assert (await client.request("POST", "/two")).content == b"ok"
            assert seen == [(0, b"/one"), (0, b"/two"), (1, b"/two")]
        finally:
            await client.aclose()
            srv.close()

    run(main())


def test_client_errors(run: Runner) -> None:
    async def main() -> None:
        with pytest.raises(ConnectError):
            await HttpClient("not-a-url").request("GET", "/")
        with pytest.raises(ConnectError):
            await HttpClient("http://127.0.0.1:bad").request("GET", "/")

        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-nope\r\n\r\n")
            writer.close()

        async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
            writer.close()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.close()

        for handler in (garbage, hangup, silent):
            srv = await asyncio.start_server(handler, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            with pytest.raises(RemoteProtocolError):  # on a new connection: never sent again
                await HttpClient(f"http://127.0.0.1:{port}").request("GET", "/")
            srv.close()

    run(main())
