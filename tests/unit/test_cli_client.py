"""Finding the manager (options, environment, data directory) and turning failures into advice."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from drove.cli.client import (
    NOT_FOUND,
    Manager,
    ManagerError,
    ManagerNotFound,
    Target,
    default_data_dir,
    resolve,
    resolve_data_dir,
    with_manager,
)

ENV_KEYS = ("DROVE_URL", "DROVE_TOKEN", "DROVE_DATA_DIR", "XDG_DATA_HOME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No drove settings leak in from the machine running the tests; HOME is empty."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def local_manager(data_dir: Path, url: str = "http://127.0.0.1:10800", token: str | None = "tok",
                  pid: int | None = None) -> Path:
    """What a running `drove serve` leaves in its data directory."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "manager.json").write_text(
        json.dumps({"url": url, "pid": os.getpid() if pid is None else pid}) + "\n")
    if token is not None:
        (data_dir / "token").write_text(token + "\n")
    return data_dir


def one_line(text: str) -> str:
    """Rich wraps messages at the terminal width; compare them as one line."""
    return " ".join(text.split())


# ------------------------------------------------------------ data directory


def test_default_data_dir_is_under_home(clean_env):
    assert default_data_dir() == clean_env / ".local" / "share" / "drove"


def test_default_data_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "drove"


def test_default_data_dir_ignores_relative_xdg(monkeypatch, clean_env):
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")
    assert default_data_dir() == clean_env / ".local" / "share" / "drove"


def test_default_data_dir_takes_an_env_mapping(tmp_path):
    assert default_data_dir({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "drove"


def test_data_dir_order(monkeypatch, tmp_path, clean_env):
    assert resolve_data_dir() == clean_env / ".local" / "share" / "drove"
    monkeypatch.setenv("DROVE_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "opt") == tmp_path / "opt"


def test_data_dir_is_absolute(monkeypatch, tmp_path, clean_env):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("rel") == tmp_path / "rel"
    assert resolve_data_dir("~/d") == clean_env / "d"


def test_module_imports_nothing_heavy():
    """The manager imports default_data_dir from it: no typer, rich or httpx on import."""
    code = ("import sys, drove.cli.client; "
            "print(sorted(m for m in ('typer', 'rich', 'httpx', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------- resolution


def test_local_manager_from_data_dir(tmp_path):
    d = local_manager(tmp_path / "data", url="http://127.0.0.1:4321/", token="secret", pid=42)
    t = resolve(data_dir=d)
    assert (t.url, t.token, t.pid, t.data_dir) == ("http://127.0.0.1:4321", "secret", 42, d)
    assert t.url_source == str(d / "manager.json")
    assert t.token_source == str(d / "token")


def test_local_manager_from_env_data_dir(monkeypatch, tmp_path):
    d = local_manager(tmp_path / "data", url="http://127.0.0.1:5555")
    monkeypatch.setenv("DROVE_DATA_DIR", str(d))
    assert resolve().url == "http://127.0.0.1:5555"


def test_local_manager_in_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    local_manager(tmp_path / "xdg" / "drove", url="http://127.0.0.1:6666", token="t")
    t = resolve()
    assert (t.url, t.token) == ("http://127.0.0.1:6666", "t")


def test_env_beats_data_dir(monkeypatch, tmp_path):
    d = local_manager(tmp_path / "data", url="http://127.0.0.1:1111", token="file")
    monkeypatch.setenv("DROVE_URL", "http://10.0.0.1:10800")
    monkeypatch.setenv("DROVE_TOKEN", "env")
    t = resolve(data_dir=d)
    assert (t.url, t.token, t.url_source, t.token_source) == (
        "http://10.0.0.1:10800", "env", "DROVE_URL", "DROVE_TOKEN")


def test_options_beat_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DROVE_URL", "http://10.0.0.1:10800")
    monkeypatch.setenv("DROVE_TOKEN", "env")
    t = resolve(url="http://10.0.0.2:10800", token="opt", data_dir=tmp_path)
    assert (t.url, t.token, t.url_source, t.token_source) == (
        "http://10.0.0.2:10800", "opt", "--url", "--token")


def test_url_and_token_resolve_separately(monkeypatch, tmp_path):
    d = local_manager(tmp_path / "data", url="http://127.0.0.1:1111", token="file")
    t = resolve(url="127.0.0.1:2222", data_dir=d)
    assert (t.url, t.token, t.token_source) == ("http://127.0.0.1:2222", "file", str(d / "token"))
    monkeypatch.setenv("DROVE_TOKEN", "env")
    t = resolve(data_dir=d)
    assert (t.url, t.token) == ("http://127.0.0.1:1111", "env")


def test_missing_token_file_is_no_token(tmp_path):
    d = local_manager(tmp_path / "data", token=None)
    t = resolve(data_dir=d)
    assert (t.token, t.token_source) == (None, None)
    (d / "token").write_text("\n")
    assert resolve(data_dir=d).token is None


def test_empty_env_counts_as_unset(monkeypatch, tmp_path):
    d = local_manager(tmp_path / "data", url="http://127.0.0.1:1111")
    monkeypatch.setenv("DROVE_URL", "")
    monkeypatch.setenv("DROVE_DATA_DIR", "")
    assert resolve(data_dir=d).url == "http://127.0.0.1:1111"


def test_nothing_found(tmp_path):
    with pytest.raises(ManagerNotFound) as err:
        resolve(data_dir=tmp_path / "empty")
    assert NOT_FOUND in str(err.value)
    assert str(tmp_path / "empty" / "manager.json") in str(err.value)
    assert NOT_FOUND == ("no drove manager found: start one with `drove serve` "
                         "or set DROVE_URL and DROVE_TOKEN")


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"pid": 1}', '{"url": ""}'])
def test_damaged_manager_json(tmp_path, content):
    (tmp_path / "manager.json").write_text(content)
    with pytest.raises(ManagerError, match="damaged"):
        resolve(data_dir=tmp_path)


def test_unreadable_token(tmp_path):
    d = local_manager(tmp_path / "data", token=None)
    (d / "token").mkdir()  # unreadable as a file, even for root
    with pytest.raises(ManagerError, match=r"cannot read the API token .*--token"):
        resolve(data_dir=d)


def test_serve_hint_names_a_non_default_data_dir(tmp_path):
    t = resolve(url="http://x", data_dir=tmp_path)
    assert t.serve_hint == f"drove serve --data-dir {tmp_path}"
    assert resolve(url="http://x").serve_hint == "drove serve"


# ------------------------------------------------------------- calling it


def target(**kw) -> Target:
    base = {"url": "http://manager", "token": "tok", "data_dir": Path("/d"),
            "url_source": "/d/manager.json", "token_source": "/d/token", "pid": None}
    return Target(**{**base, **kw})


def mock(handler, **kw) -> Manager:
    return Manager(target(**kw), transport=httpx.MockTransport(handler))


def test_calls_carry_the_token_and_parse_json():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    with mock(handler) as m:
        assert m.get("/v1/volumes") == {"ok": True}
        m.delete("/v1/volumes/db", force=True, other=None)
        m.post("/v1/volumes", {"name": "db"})
    assert seen[0].headers["Authorization"] == "Bearer tok"
    assert seen[1].url.params == httpx.QueryParams({"force": "true"})
    assert json.loads(seen[2].content) == {"name": "db"}


def test_no_token_no_header():
    headers = []

    def handler(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers.get("Authorization"))
        return httpx.Response(200, json=[])

    with mock(handler, token=None, token_source=None) as m:
        m.get("/v1/health")
    assert headers == [None]


def test_error_detail_and_status():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"detail": "volume db is attached; detach it first"})

    with mock(handler) as m, pytest.raises(ManagerError) as err:
        m.delete("/v1/volumes/db")
    assert str(err.value) == "volume db is attached; detach it first (HTTP 409)"
    assert err.value.status == 409


def test_error_without_json():
    with mock(lambda r: httpx.Response(502, text="bad gateway")) as m, \
            pytest.raises(ManagerError, match=r"^bad gateway \(HTTP 502\)$"):
        m.get("/v1/volumes")


def test_wrong_token_says_where_the_token_is():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"detail": "missing or wrong API token"})

    with mock(handler, token_source="--token", url_source="--url") as m, \
            pytest.raises(ManagerError) as err:
        m.get("/v1/volumes")
    assert err.value.status == 401
    assert "refused the API token from --token" in str(err.value)
    assert "DATA_DIR/token" in str(err.value)
    with mock(handler, token=None, token_source=None) as m, pytest.raises(ManagerError) as err:
        m.get("/v1/volumes")
    assert "wants an API token" in str(err.value)
    assert "/d/token" in str(err.value) and "DROVE_TOKEN" in str(err.value)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_says_how_to_start(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    local_manager(tmp_path, url=url, pid=2**22 + 12345)  # above pid_max: gone
    with Manager(resolve(data_dir=tmp_path)) as m, pytest.raises(ManagerError) as err:
        m.get("/v1/volumes")
    msg = str(err.value)
    assert f"the drove manager at {url} is not running" in msg
    assert "left from a crash" in msg
    assert f"`drove serve --data-dir {tmp_path}`" in msg
    assert err.value.status is None


def test_connection_refused_names_the_url_option(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    with Manager(resolve(url=url, token="t", data_dir=tmp_path)) as m, \
            pytest.raises(ManagerError, match=r"not running.*check --url"):
        m.get("/v1/volumes")


@contextlib.contextmanager
def post_server(answer: Callable[[str, bytes], tuple[int, dict[str, str], bytes]]):
    """A real HTTP server on loopback whose POSTs ``answer(path, body)`` gives; its port."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            status, headers, body = answer(
                self.path, self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(status)
            for k, v in {**headers, "Content-Type": "application/json",
                         "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_several_managers_the_first_that_answers_serves(tmp_path):
    hits = []

    def answer(path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        hits.append((path, body))
        return 201, {}, b'{"name": "db"}'

    with post_server(answer) as port:
        dead = f"http://127.0.0.1:{closed_port()}"
        live = f"127.0.0.1:{port}"
        env = {"DROVE_URL": f"{dead}, {live}", "DROVE_TOKEN": "t"}
        t = resolve(data_dir=tmp_path, env=env)
        assert t.url == dead and t.others == (f"http://{live}",)
        with Manager(t) as m:
            # A refused connection sent nothing: the POST goes to the next manager, once.
            assert m.post("/v1/volumes", {"name": "db"}) == {"name": "db"}
            assert m.url == f"http://{live}"
            m.post("/v1/volumes", {"name": "db"})
        assert [h[0] for h in hits] == ["/v1/volumes", "/v1/volumes"]
        both_dead = {"DROVE_URL": f"{dead},http://127.0.0.1:{closed_port()}"}
        with Manager(resolve(data_dir=tmp_path, env=both_dead)) as m, \
                pytest.raises(ManagerError) as err:
            m.get("/v1/volumes")
        assert f"at {dead} nor at http://127.0.0.1:" in str(err.value)
        with pytest.raises(ManagerNotFound, match="holds no URL"):
            resolve(data_dir=tmp_path, env={"DROVE_URL": " , "})


# ------------------------------------------------------- the typer glue


app = typer.Typer()


@app.command()
@with_manager
def where(mgr: Manager, what: str, loud: bool = False) -> None:
    """Print where the manager is."""
    t = mgr.target
    typer.echo(json.dumps({"what": what, "loud": loud, "url": t.url, "token": t.token,
                           "data_dir": str(t.data_dir)}))


@app.command()
@with_manager
def volumes(mgr: Manager) -> None:
    """Call the manager."""
    mgr.get("/v1/volumes")


runner = CliRunner()


def test_options_reach_the_command(tmp_path):
    res = runner.invoke(app, ["where", "db", "--loud", "--url", "127.0.0.1:9", "--token", "x",
                              "--data-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"what": "db", "loud": True, "url": "http://127.0.0.1:9",
                                      "token": "x", "data_dir": str(tmp_path)}


def test_env_reaches_the_command(tmp_path):
    res = runner.invoke(app, ["where", "db"], env={"DROVE_URL": "http://h:1", "DROVE_TOKEN": "e",
                                                   "DROVE_DATA_DIR": str(tmp_path)})
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["url"], out["token"], out["data_dir"]) == ("http://h:1", "e", str(tmp_path))


def test_data_dir_option_finds_the_local_manager(tmp_path):
    d = local_manager(tmp_path / "data", url="http://127.0.0.1:7777", token="file")
    res = runner.invoke(app, ["where", "db", "--data-dir", str(d)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["token"] == "file"


def test_no_manager_message_and_exit_status(tmp_path):
    res = runner.invoke(app, ["where", "db", "--data-dir", str(tmp_path / "none")])
    assert res.exit_code == 1
    assert NOT_FOUND in one_line(res.output)


def test_manager_errors_become_messages(tmp_path):
    res = runner.invoke(app, ["volumes", "--url", f"http://127.0.0.1:{closed_port()}",
                              "--token", "t", "--data-dir", str(tmp_path)])
    assert res.exit_code == 1
    assert "is not running" in one_line(res.output)
    assert "Traceback" not in res.output


def test_help_shows_the_connection_options():
    res = runner.invoke(app, ["where", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for option in ("--url", "--token", "--data-dir", "DROVE_URL", "DROVE_TOKEN",
                   "DROVE_DATA_DIR", "--loud"):
        assert option in res.output
    assert "mgr" not in res.output.replace("Manager connection", "")


def test_every_manager_command_takes_the_options():
    """Each command of the manager's sub-apps has --url, --token, --data-dir (and --json)."""
    from drove.cli import disk, event, node, settings, snapshot, volume

    root = typer.Typer()
    for module in (volume, snapshot, disk, node, event, settings):
        root.add_typer(module.app, name=module.__name__.rsplit(".", 1)[1])
    groups = typer.main.get_command(root).commands
    assert len(groups) == 6
    for group in groups.values():
        assert group.commands
        for name, command in group.commands.items():
            opts = {o for p in command.params for o in p.opts}
            assert {"--url", "--token", "--data-dir", "--json"} <= opts, (group.name, name)


def test_a_call_waits_out_an_election_but_never_resends_what_may_be_done(tmp_path):
    answers: list[tuple[int, dict[str, str]]] = []
    hits = []

    def answer(path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        hits.append(body)
        status, headers = answers.pop(0)
        return status, headers, json.dumps({"detail": f"answer {status}"}).encode()

    with post_server(answer) as port:
        env = {"DROVE_URL": f"http://127.0.0.1:{port}", "DROVE_TOKEN": "t"}
        with Manager(resolve(data_dir=tmp_path, env=env)) as m:
            # No leader yet, twice (the follower did nothing): sent again, then done once.
            answers[:] = [(503, {"Retry-After": "0"}), (503, {"Retry-After": "0"}), (201, {})]
            assert m.post("/v1/volumes", {"name": "db"}) == {"detail": "answer 201"}
            assert len(hits) == 3 and not answers
            # A 503 without the hint, or a 502 (the leader may have done it): not sent again.
            for status, headers in [(503, {}), (502, {}), (503, {"Retry-After": "soon"})]:
                hits.clear()
                answers[:] = [(status, headers), (201, {})]
                with pytest.raises(ManagerError) as err:
                    m.post("/v1/volumes", {"name": "db"})
                assert err.value.status == status and len(hits) == 1
