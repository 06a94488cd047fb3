"""drove.web (the control APIs' HTTP server) and drove.webclient (the engine's HTTP client)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from drove.web import App, Body, Field, HttpServer, Request, Response, json_response
from drove.webclient import ConnectError, HttpClient, RemoteProtocolError, Timeout


class Conflict(ValueError):
    pass


def make_app() -> App:
    app = App("test", "1")

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
        await asyncio.sleep(0.6)
        return {"ok": True}

    return app


def call(app: App, method: str, target: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    import json

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


def serve(app: App):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return HttpServer(app, sock), f"http://127.0.0.1:{sock.getsockname()[1]}"


async def raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(0.3):  # kept-alive connections stay open
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        pass
    writer.close()
    return out


def test_server_and_client() -> None:
    async def main() -> None:
        server, url = serve(make_app())
        await server.start()
        client = HttpClient(url, timeout=0.3)
        try:
            for i in range(3):  # one kept-alive connection
                r = await client.request("POST", "/things", json={"name": "a", "size": i + 1})
                assert r.status_code == 201 and r.json()["size"] == i + 1
            assert len(client._idle) == 1
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
            # pipelined, chunked, 100-continue, HTTP/1.0, garbage
            out = await raw(url, b"GET /things/a HTTP/1.1\r\nhost: x\r\n\r\n" * 2)
            assert out.count(b"HTTP/1.1 200 OK") == 2
            out = await raw(url, b"PUT /state HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
                                 b"3\r\n{\"a\r\n5\r\n\": 1}\r\n0\r\n\r\n")
            assert out.endswith(b'{"a":1}')
            out = await raw(url, b"PUT /state HTTP/1.1\r\nexpect: 100-continue\r\n"
                                 b"content-length: 2\r\n\r\n{}")
            assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
            out = await raw(url, b"GET /things/a HTTP/1.0\r\n\r\n")
            assert b"connection: close" in out and out.endswith(b'"n":3}')
            assert (await raw(url, b"HELLO\r\n\r\n")).startswith(b"HTTP/1.1 400")
            assert (await raw(url, b"GET / HTTP/1.1\r\nx: " + b"a" * 70000 + b"\r\n\r\n")
                    ).startswith(b"HTTP/1.1 431")
            assert (await raw(url, b"PUT /state HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n")
                    ).startswith(b"HTTP/1.1 413")
            # a request running when the server stops is answered
            slow = asyncio.ensure_future(client.request("GET", "/slow", timeout=5))
            await asyncio.sleep(0.2)
            await server.stop()
            assert (await slow).status_code == 200
            with pytest.raises(ConnectError):
                await HttpClient(url).request("GET", "/things/a")
        finally:
            await client.aclose()
            await server.stop()

    asyncio.run(main())


def test_client_errors() -> None:
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

        for handler in (garbage, hangup):
            srv = await asyncio.start_server(handler, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            with pytest.raises(RemoteProtocolError):
                await HttpClient(f"http://127.0.0.1:{port}").request("GET", "/")
            srv.close()

    asyncio.run(main())



@pytest.mark.parametrize("kind", ["replica", "engine"])
def test_lean_serve_parser_takes_the_cli_options(kind: str, monkeypatch) -> None:
    """`python -m drove KIND serve` parses with argparse: the typer command's options, alike."""
    import typer.main

    from drove import launch
    from drove.cli.main import app

    command = typer.main.get_command(app).commands[kind].commands["serve"]  # type: ignore
    cli_opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)
                if o.startswith("--") and o != "--help"}
    parser, _ = launch.COMMANDS[kind]
    assert {o for a in parser()._actions for o in a.option_strings} == cli_opts
    argv, expected = [], {}
    for p in command.params:
        if p.param_type_name == "argument":
            argv.insert(0, "arg")
            expected[p.name] = "arg"
        elif p.is_flag:
            flag = p.secondary_opts[0] if p.default else p.opts[0]
            argv.append(flag)
            expected[p.name] = not p.default
        else:
            value = "2.5" if p.name == "timeout" else "v"
            argv += [p.opts[0], value]
            expected[p.name] = [value] if p.multiple else value
    seen: dict[str, Any] = {}
    monkeypatch.setitem(launch.COMMANDS, kind, (parser, lambda **kw: seen.update(kw)))
    launch.serve(kind, argv)
    assert {k: str(v) if not isinstance(v, bool | list) else v for k, v in seen.items()} == \
        expected
    with pytest.raises(launch.Unparsed):
        parser().parse_args([*argv, "--bogus"])
