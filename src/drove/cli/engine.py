"""`drove engine ...`: serve one volume over NBD, mirrored to replicas, and operate it."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import typer

from drove.cli.fromtable import command_from_table
from drove.cli.output import JsonOpt, api_call, emit, fail, parse_labels, table
from drove.launch import serve_engine
from drove.replica.access import KEY_ENV
from drove.serve_options import ENGINE
from drove.units import format_size, parse_size

app = typer.Typer(help="Serve one volume (mirrored to its replicas) and operate it.",
                  no_args_is_help=True)

UrlOpt = Annotated[str, typer.Option("--url", "-u", envvar="DROVE_ENGINE_URL",
                                     help="control API of the engine, e.g. http://127.0.0.1:10820")]


def _call(method: str, url: str, path: str, **kwargs: Any) -> Any:
    # An engine started with an access key (every engine the agent starts) answers only
    # calls that carry it: DROVE_NBD_KEY, as for `drove replica ...`.
    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get(KEY_ENV)) else {}
    return api_call(method, url, path, serve_hint="drove engine serve", headers=headers,
                    **kwargs)


app.command("serve")(command_from_table(ENGINE, serve_engine))


@app.command()
def info(url: UrlOpt, json_out: JsonOpt = False) -> None:
    """Show the volume's health and its replicas."""
    data = _call("GET", url, "/v1/info")
    if emit(data, json_out):
        return
    typer.echo(f"{data['name']}  {format_size(data['size'])}  {data['health']}  "
               f"generation {data['generation']}")
    quorum = data.get("write_quorum") or {}
    if quorum.get("required") and quorum.get("met") is False:
        typer.echo(f"writes waiting (up to {quorum.get('wait_seconds')} s each, then EIO): no "
                   f"replica outside the engine's process; {quorum.get('waiting')} waiting now")
    upgrade = data.get("upgrade")
    if upgrade:  # the last live upgrade this engine took part in (drove.engine.handoff)
        typer.echo(f"upgrade to pid {upgrade.get('successor')}: {upgrade.get('state')}"
                   + (f" ({upgrade['error']})" if upgrade.get("error") else "")
                   + f"; epoch {data.get('epoch')}")
    table("replicas", ["name", "mode", "url", "error"],
          [[r["name"], r["mode"], r["url"], r["error"]] for r in data["replicas"]])
    if data.get("rebuild"):
        rb = data["rebuild"]
        typer.echo(f"rebuild of {rb['replica']}: {rb['state']} "
                   f"{format_size(rb['bytes_done'])}/{format_size(rb['bytes_total'])}")


@app.command()
def stats(url: UrlOpt, json_out: JsonOpt = False) -> None:
    """Show IOPS, throughput and latency per operation."""
    data = _call("GET", url, "/v1/stats")
    if emit(data, json_out):
        return
    rows = []
    for op, s in data["ops"].items():
        rate = data["rates_10s"][op]
        rows.append([op, s["count"], s["errors"], format_size(s["bytes"]), rate["iops"],
                     format_size(int(rate["bytes_per_second"])) + "/s", s["mean_us"],
                     s["p99_us"]])
    table("operations", ["op", "count", "errors", "bytes", "iops (10s)", "rate (10s)",
                         "mean µs", "p99 µs ≤"], rows)


@app.command()
def events(url: UrlOpt, json_out: JsonOpt = False) -> None:
    """What the engine did and why."""
    data = _call("GET", url, "/v1/events")
    if emit(data, json_out):
        return
    for e in data:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        typer.echo(f"{stamp}  {e['kind']:18} {e['message']}")


@app.command("add-replica")
def add_replica(
    url: UrlOpt,
    name: Annotated[str, typer.Argument(help="replica name (an existing ERR one is rebuilt)")],
    replica_url: Annotated[str | None, typer.Argument(help="control URL of a new replica")] = None,
    wait: Annotated[bool, typer.Option(help="show progress until the rebuild ends")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Rebuild a replica online (new with REPLICA_URL, or an ERR one by NAME)."""
    data = _call("POST", url, "/v1/replicas", json={"name": name, "url": replica_url})
    if wait:
        data = _follow_rebuild(url, json_out)
    if not emit(data, json_out):
        typer.echo(f"rebuild of {name}: {data['state']}")
    if data["state"] == "failed":
        fail(f"rebuild failed: {data['error']}")


def _follow_rebuild(url: str, quiet: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), disable=quiet, transient=True) as progress:
        task = progress.add_task("rebuilding", total=None)
        while True:
            data = _call("GET", url, "/v1/rebuild")
            progress.update(task, total=data["bytes_total"] or None, completed=data["bytes_done"],
                            description=f"rebuilding {data['replica']}")
            if data["state"] in ("done", "failed", "cancelled"):
                return data
            time.sleep(0.2)


@app.command("remove-replica")
def remove_replica(url: UrlOpt, name: str, json_out: JsonOpt = False) -> None:
    """Take replica NAME out of the volume."""
    data = _call("DELETE", url, f"/v1/replicas/{name}")
    if not emit(data, json_out):
        typer.echo(f"replica {name} removed")


@app.command()
def snapshot(url: UrlOpt, name: str,
             label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable")] = None,
             json_out: JsonOpt = False) -> None:
    """Snapshot the volume as NAME on every replica (I/O pauses briefly)."""
    data = _call("POST", url, "/v1/snapshots", json={"name": name, "labels": parse_labels(label)})
    if not emit(data, json_out):
        typer.echo(f"snapshot {name} created (I/O paused {data['pause_ms']} ms)")


@app.command()
def layers(url: UrlOpt, json_out: JsonOpt = False) -> None:
    """List the volume's snapshot chain."""
    data = _call("GET", url, "/v1/snapshots")
    if emit(data, json_out):
        return
    rows = [[la.get("name") or "(head)", la.get("parent"), la.get("created"),
             format_size(la.get("allocated", 0) or 0), "removed" if la.get("removed") else ""]
            for la in data]
    table("layers", ["name", "parent", "created", "data", ""], rows)


@app.command()
def delete(url: UrlOpt, name: str, json_out: JsonOpt = False) -> None:
    """Delete snapshot NAME on every replica."""
    data = _call("DELETE", url, f"/v1/snapshots/{name}")
    if not emit(data, json_out):
        typer.echo(f"snapshot {name} deleted")


@app.command()
def revert(url: UrlOpt, name: str,
           force: Annotated[bool, typer.Option(help="even with NBD clients connected")] = False,
           json_out: JsonOpt = False) -> None:
    """Revert the volume to snapshot NAME (disconnect clients first)."""
    data = _call("POST", url, "/v1/revert", json={"snapshot": name, "force": force})
    if not emit(data, json_out):
        typer.echo(f"reverted to {name}")


@app.command()
def expand(url: UrlOpt, size: str, json_out: JsonOpt = False) -> None:
    """Grow the volume to SIZE on every replica (new connections see the new size)."""
    try:
        size_bytes = parse_size(size)
    except ValueError as exc:
        fail(str(exc))
    data = _call("POST", url, "/v1/expand", json={"size": size_bytes})
    if not emit(data, json_out):
        typer.echo(f"expanded to {format_size(data['size'])}")
