"""Finding the drove manager and calling its REST API (docs/api.md).

Where the manager is, in this order:

* ``--url`` / ``--token`` on the command line;
* else the environment: ``DROVE_URL`` / ``DROVE_TOKEN``;
* else the local manager of the data directory (``--data-dir``, else
  ``DROVE_DATA_DIR``, else :func:`default_data_dir`): its ``manager.json``
  (``{"url": ..., "pid": ...}``, written by ``drove serve`` while it runs) and its
  ``token`` file.

A URL may list several managers, comma-separated (a cluster): a call goes to the
first that accepts the connection, and that one goes first from then on.

URL and token are looked up separately, so ``--url`` with no token still takes
the token of the local data directory.

This module is imported by the manager (for :func:`default_data_dir`), so it
imports nothing heavy at import time: httpx, typer and rich are imported by the
functions that need them.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ELECTION_WAIT = 20.0
"""Seconds a call waits out a manager's "retry after" answer (no leader during an election:
the next one is elected within 10 s of the old one's death)."""

NOT_FOUND = ("no drove manager found: start one with `drove serve` "
             "or set DROVE_URL and DROVE_TOKEN")


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/drove``, else ``~/.local/share/drove``.

    A relative ``XDG_DATA_HOME`` is ignored, as the XDG spec asks.
    """
    env = os.environ if env is None else env
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "drove"
    return Path.home() / ".local" / "share" / "drove"


class ManagerError(Exception):
    """The manager cannot be found or refused a call; the message says what to do next.

    ``status`` is the HTTP status of a refused call (None when there was no answer).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ManagerNotFound(ManagerError):
    """No URL given and no running local manager."""


@dataclass(frozen=True)
class Target:
    """Where the manager is and how to authenticate, with where each came from."""

    url: str
    token: str | None
    data_dir: Path
    url_source: str               # "--url", "DROVE_URL" or the manager.json path
    token_source: str | None      # "--token", "DROVE_TOKEN", the token file path, or None
    pid: int | None = None        # of the local manager, from manager.json
    others: tuple[str, ...] = ()  # more managers to try when ``url`` does not answer

    @property
    def token_file(self) -> Path:
        """Where the manager keeps its token (on the manager's host)."""
        return self.data_dir / "token"

    @property
    def serve_hint(self) -> str:
        """The command that starts the manager of this data directory."""
        if self.data_dir == resolve_data_dir():
            return "drove serve"
        return f"drove serve --data-dir {self.data_dir}"


def resolve_data_dir(data_dir: str | Path | None = None,
                     env: Mapping[str, str] | None = None) -> Path:
    """The data directory: ``data_dir``, else ``DROVE_DATA_DIR``, else the default (absolute)."""
    env = os.environ if env is None else env
    chosen = data_dir or env.get("DROVE_DATA_DIR") or default_data_dir(env)
    return Path(chosen).expanduser().absolute()


def normalize_url(url: str) -> str:
    """``host:port`` -> ``http://host:port``; no trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def resolve(url: str | None = None, token: str | None = None,
            data_dir: str | Path | None = None,
            env: Mapping[str, str] | None = None) -> Target:
    """Where the manager is (see the module's docstring); ManagerNotFound if nowhere."""
    env = os.environ if env is None else env
    directory = resolve_data_dir(data_dir, env)
    pid = None
    if url:
        url_source = "--url"
    elif env.get("DROVE_URL"):
        url, url_source = env["DROVE_URL"], "DROVE_URL"
    else:
        info_file = directory / "manager.json"
        info = _read_manager_json(info_file)
        if info is None:
            raise ManagerNotFound(f"{NOT_FOUND} (no running manager in {directory}: "
                                  f"{info_file} does not exist)")
        url, pid, url_source = info["url"], info.get("pid"), str(info_file)
    if token:
        token_source: str | None = "--token"
    elif env.get("DROVE_TOKEN"):
        token, token_source = env["DROVE_TOKEN"], "DROVE_TOKEN"
    else:
        token_file = directory / "token"
        token = _read_token(token_file)
        token_source = str(token_file) if token else None
    # Several managers (a cluster): "u1,u2,..."; the first that answers serves.
    urls = [normalize_url(u) for u in url.split(",") if u.strip()]
    if not urls:
        raise ManagerNotFound(f"{NOT_FOUND} ({url_source} holds no URL)")
    return Target(url=urls[0], token=token, data_dir=directory,
                  url_source=url_source, token_source=token_source,
                  pid=pid if isinstance(pid, int) else None, others=tuple(urls[1:]))


def _read_manager_json(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManagerError(f"cannot read {path}: {exc.strerror}; run drove as the user "
                           "that runs `drove serve`, or set DROVE_URL and DROVE_TOKEN") from exc
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("url"), str) or not info["url"]:
        raise ManagerError(f"{path} is damaged (want {{\"url\": ..., \"pid\": ...}}); "
                           "restart the manager (`drove serve`) to rewrite it, or set DROVE_URL")
    return info


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManagerError(f"cannot read the API token in {path}: {exc.strerror}; run drove "
                           "as the user that runs `drove serve`, or pass --token "
                           "(or set DROVE_TOKEN)") from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


class Manager:
    """A connection to the manager's API: get/post/patch/delete return the parsed JSON.

    Every failure raises ManagerError with a message that says what to do next.
    Use it as a context manager (or call close()) to release the connection.
    """

    def __init__(self, target: Target, *, timeout: float = 600.0,
                 transport: Any = None) -> None:
        import httpx

        self.target = target
        headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
        self._urls = [target.url, *target.others]
        self._http = httpx.Client(headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=10.0))

    @classmethod
    def connect(cls, url: str | None = None, token: str | None = None,
                data_dir: str | Path | None = None, **kwargs: Any) -> Manager:
        """A Manager for what :func:`resolve` finds."""
        return cls(resolve(url, token, data_dir), **kwargs)

    @property
    def url(self) -> str:
        """The base URL of the manager that answered last (else the first one)."""
        return self._urls[0]

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the connection."""
        self._http.close()

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` with query ``params`` (None values left out)."""
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        """POST ``body`` as JSON."""
        return self.request("POST", path, json=body)

    def patch(self, path: str, body: Any) -> Any:
        """PATCH ``body`` as JSON."""
        return self.request("PATCH", path, json=body)

    def delete(self, path: str, **params: Any) -> Any:
        """DELETE ``path`` with query ``params`` (None values left out)."""
        return self.request("DELETE", path, params=params)

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                json: Any = None) -> Any:
        """One call; the answer's JSON (its text if it is not JSON)."""
        import httpx

        query = {k: _query_value(v) for k, v in (params or {}).items() if v is not None}
        try:
            resp = self._send_through_elections(method, path, query, json)
        except httpx.ConnectError as exc:
            raise ManagerError(self._not_running(exc)) from exc
        except httpx.TimeoutException as exc:
            raise ManagerError(f"the drove manager at {self.url} did not answer {method} {path} "
                               f"in time ({type(exc).__name__}); is it overloaded or stuck? "
                               "`drove event list` may tell") from exc
        except httpx.HTTPError as exc:
            raise ManagerError(f"cannot reach the drove manager at {self.url}: {exc}") from exc
        if resp.status_code == 401:
            raise ManagerError(self._unauthorized(), 401)
        if resp.status_code >= 400:
            raise ManagerError(f"{_detail(resp)} (HTTP {resp.status_code})", resp.status_code)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def _send_through_elections(self, method: str, path: str, query: dict[str, Any],
                                json: Any) -> Any:
        """:meth:`_send`, sent again while a manager answers 503 with Retry-After.

        A manager says so only for what it did not do (no leader known yet, or the
        leader could not be reached), so even a POST is safe to send again.
        """
        import time

        deadline = time.monotonic() + ELECTION_WAIT
        while True:
            resp = self._send(method, path, query, json)
            wait = _retry_after(resp)
            if wait is None or time.monotonic() + wait > deadline:
                return resp
            time.sleep(wait)  # the manager's own hint; the election has no event to wait on

    def _send(self, method: str, path: str, query: dict[str, Any], json: Any) -> Any:
        """The request to the first manager that accepts the connection (it goes first then).

        Only a refused or failed connect moves on: the request was not sent, so even a
        POST is safe to send to the next manager.
        """
        import httpx

        for i, base in enumerate(self._urls):
            try:
                resp = self._http.request(method, base + path, params=query, json=json)
            except httpx.ConnectError:
                if i == len(self._urls) - 1:
                    raise
                continue
            if i:
                self._urls.insert(0, self._urls.pop(i))
            return resp
        raise AssertionError("unreachable: there is always one URL")

    def _not_running(self, exc: Exception) -> str:
        t = self.target
        refused = isinstance(exc.__context__, ConnectionRefusedError) or "refused" in str(exc)
        why = "connection refused" if refused else str(exc)
        if t.url_source in ("--url", "DROVE_URL"):
            where = " nor at ".join(self._urls)
            return (f"the drove manager at {where} is not running or not reachable ({why}): "
                    f"start it with `drove serve`, or check {t.url_source}")
        stale = ""
        if t.pid is not None and not _pid_alive(t.pid):
            stale = f"; its process {t.pid} is gone, {t.url_source} is left from a crash"
        return (f"the drove manager at {t.url} is not running ({why}{stale}): "
                f"start it with `{t.serve_hint}`")

    def _unauthorized(self) -> str:
        t = self.target
        where = ("a user's token: the first admin's is in DATA_DIR/token on the manager's "
                 "host, `drove user token NAME` makes more")
        if t.token is None:
            return (f"the drove manager at {t.url} wants an API token and none was found "
                    f"(no {t.token_file}): pass --token or set DROVE_TOKEN ({where})")
        if t.token_source in ("--token", "DROVE_TOKEN"):
            return (f"the drove manager at {t.url} refused the API token from "
                    f"{t.token_source} (unknown there, or revoked): give that manager's "
                    f"token ({where})")
        if t.url_source in ("--url", "DROVE_URL"):
            return (f"the drove manager at {t.url} refused the API token in {t.token_source}: "
                    f"give that manager's token with --token or DROVE_TOKEN ({where})")
        return (f"the drove manager at {t.url} refused the API token in {t.token_source}: "
                "it was revoked (`drove user token admin` prints a new one), or the file "
                f"changed after it started (restart it: `{t.serve_hint}`); or pass a user's "
                "token with --token")


def _query_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _detail(resp: Any) -> str:
    try:
        detail = resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        detail = resp.text.strip() or resp.reason_phrase
    return detail if isinstance(detail, str) else json.dumps(detail)


# ------------------------------------------------------------------ typer glue

_PANEL = "Manager connection"


def _connection_parameters() -> list[inspect.Parameter]:
    """--url, --token, --data-dir as keyword-only parameters typer understands."""
    from typing import Annotated

    import typer

    def option(decl: str, help_text: str) -> Any:
        return typer.Option(decl, help=help_text, show_default=False, rich_help_panel=_PANEL)

    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("manager_url", kw, default=None, annotation=Annotated[
            str | None, option("--url", "manager API URL, e.g. http://127.0.0.1:10800, or "
                                        "several comma-separated (the first that answers "
                                        "serves) (env DROVE_URL; default: the running "
                                        "manager of --data-dir)")]),
        inspect.Parameter("manager_token", kw, default=None, annotation=Annotated[
            str | None, option("--token", "API token (env DROVE_TOKEN; default: the token "
                                          "file in --data-dir)")]),
        inspect.Parameter("manager_data_dir", kw, default=None, annotation=Annotated[
            Path | None, option("--data-dir", "data directory of the local manager (env "
                                             "DROVE_DATA_DIR; default: $XDG_DATA_HOME/drove "
                                             "or ~/.local/share/drove)")]),
    ]


def with_manager(func: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``func(mgr, ...)`` a command taking --url/--token/--data-dir.

    The command receives a connected :class:`Manager` as its first argument (the
    parameter is hidden from the command line); a ManagerError anywhere in it
    becomes an error message and exit status 1. Put it under ``@app.command()``::

        @app.command()
        @with_manager
        def get(mgr: Manager, name: str) -> None: ...
    """
    sig = inspect.signature(func, eval_str=True)
    own = list(sig.parameters.values())[1:]
    params = own + _connection_parameters()
    clash = {p.name for p in own} & {p.name for p in params[len(own):]}
    if clash:
        raise TypeError(f"{func.__name__}: parameter(s) {clash} are the connection options'")

    def command(*args: Any, manager_url: str | None = None, manager_token: str | None = None,
                manager_data_dir: Path | None = None, **kwargs: Any) -> Any:
        from drove.cli.output import fail

        try:
            with Manager.connect(manager_url, manager_token, manager_data_dir) as mgr:
                return func(mgr, *args, **kwargs)
        except ManagerError as exc:
            fail(str(exc))

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(command, attr, getattr(func, attr))
    return command


# ------------------------------------------- showing the manager's answers


def local_time(iso: str | None) -> str:
    """An API timestamp (ISO 8601, UTC) as local ``YYYY-mm-dd HH:MM:SS``."""
    if not iso:
        return ""
    try:
        stamp = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if stamp.tzinfo is None:
        return stamp.strftime("%Y-%m-%d %H:%M:%S")
    return stamp.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def labels_text(labels: Mapping[str, str] | None) -> str:
    """``{"app": "pg"}`` -> ``app=pg`` (comma-separated)."""
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def show_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A rich table that never cuts values short: a column named like ``"size>"`` holds
    figures (right-aligned); values too long for the screen fold onto more lines. Cells
    may hold markup. Printed to a pipe, the table takes the width it needs.
    """
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    from drove.cli.output import console

    t = Table(title=title, title_justify="left")
    for column in columns:
        if column.endswith(">"):
            t.add_column(column[:-1], justify="right", overflow="fold")
        else:
            t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    out = console
    if not console.is_terminal:  # a pipe or a file: no screen to fit
        natural = Measurement.get(console, console.options.update(max_width=10_000), t).maximum
        out = Console(width=max(console.width, natural))
    out.print(t)


def _retry_after(resp: Any) -> float | None:
    """Seconds to wait before sending again, if ``resp`` is a 503 that asks for it."""
    if resp.status_code != 503:
        return None
    try:
        return min(max(float(resp.headers["retry-after"]), 0.1), 5.0)
    except (KeyError, ValueError):
        return None
