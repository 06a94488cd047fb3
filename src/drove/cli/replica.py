"""`drove replica ...`: serve a replica directory and operate a running replica."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from drove.cli.fromtable import command_from_table
from drove.cli.output import JsonOpt, api_call, emit, fail, parse_labels, table
from drove.launch import serve_replica
from drove.replica.access import KEY_ENV
from drove.serve_options import REPLICA
from drove.units import format_size, parse_size

app = typer.Typer(help="Serve one replica (a chain of sparse files) and operate it.",
                  no_args_is_help=True)

UrlOpt = Annotated[str, typer.Option("--url", "-u", envvar="DROVE_REPLICA_URL",
                                     help="control API of the replica, e.g. http://127.0.0.1:10810")]


EpochOpt = Annotated[int | None, typer.Option(
    "--epoch", envvar="DROVE_EPOCH", min=1,
    help="the epoch of the engine that owns the replica (`drove replica info` shows it); "
         "changes are refused without it once an engine has served the replica")]

app.command("serve")(command_from_table(REPLICA, serve_replica))


def _call(method: str, url: str, path: str, epoch: int | None = None, **kwargs: Any) -> Any:
    # A replica started with an access key answers only calls that carry it (DROVE_NBD_KEY).
    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get(KEY_ENV)) else {}
    if epoch is not None:
        headers["Drove-Epoch"] = str(epoch)
    return api_call(method, url, path, serve_hint="drove replica serve", headers=headers,
                    **kwargs)


@app.command()
def info(url: UrlOpt, json_out: JsonOpt = False) -> None:
    """Show the replica's size, head and addresses."""
    data = _call("GET", url, "/v1/info")
    if not emit(data, json_out):
        for key in ("dir", "size", "head", "layers", "snapshots", "epoch"):
            value = format_size(data[key]) if key == "size" else data[key]
            typer.echo(f"{key:10} {value}")
        if data.get("rebuilding"):
            typer.echo(f"{'rebuilding':10} {len(data.get('incomplete', []))} layers incomplete: "
                       f"{', '.join(data.get('incomplete', []))}")
        for key, value in data["addresses"].items():
            typer.echo(f"{key:10} {value}")


@app.command()
def layers(url: UrlOpt, removed: Annotated[bool, typer.Option(help="include removed")] = False,
           json_out: JsonOpt = False) -> None:
    """List the chain: every layer, its parent and its data."""
    data = _call("GET", url, "/v1/layers", params={"removed": removed})
    if emit(data, json_out):
        return
    rows = [[layer.get("name") or "(head)", layer.get("file"), layer.get("parent"),
             layer.get("created"), format_size(layer.get("allocated", 0) or 0),
             "removed" if layer.get("removed") else ""] for layer in data]
    table("layers", ["name", "file", "parent", "created", "data", ""], rows)


@app.command()
def snapshot(url: UrlOpt, name: str,
             label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable")] = None,
             epoch: EpochOpt = None, json_out: JsonOpt = False) -> None:
    """Snapshot the head as NAME."""
    data = _call("POST", url, "/v1/snapshots", epoch,
                 json={"name": name, "labels": parse_labels(label)})
    if not emit(data, json_out):
        typer.echo(f"snapshot {name} created")


@app.command()
def delete(url: UrlOpt, name: str,
           purge: Annotated[bool, typer.Option(help="purge removed layers now")] = True,
           epoch: EpochOpt = None, json_out: JsonOpt = False) -> None:
    """Delete snapshot NAME (its data is folded into its child)."""
    data = _call("DELETE", url, f"/v1/snapshots/{name}", epoch, params={"purge": purge})
    if not emit(data, json_out):
        typer.echo(f"snapshot {name} removed")


@app.command()
def purge(url: UrlOpt, epoch: EpochOpt = None, json_out: JsonOpt = False) -> None:
    """Fold or prune removed snapshots."""
    data = _call("POST", url, "/v1/purge", epoch)
    if not emit(data, json_out):
        typer.echo(f"purge done ({data['purge_steps']} steps)")


@app.command()
def revert(url: UrlOpt, name: str, epoch: EpochOpt = None, json_out: JsonOpt = False) -> None:
    """Start a new head on snapshot NAME (data written since is dropped)."""
    data = _call("POST", url, "/v1/revert", epoch, json={"snapshot": name})
    if not emit(data, json_out):
        typer.echo(f"reverted to {name}")


@app.command()
def expand(url: UrlOpt, size: str, epoch: EpochOpt = None, json_out: JsonOpt = False) -> None:
    """Grow the volume to SIZE (e.g. 20G)."""
    try:
        size_bytes = parse_size(size)
    except ValueError as exc:
        fail(str(exc))
    data = _call("POST", url, "/v1/expand", epoch, json={"size": size_bytes})
    if not emit(data, json_out):
        typer.echo(f"expanded to {format_size(data['size'])}")


@app.command()
def checksum(url: UrlOpt, name: str, json_out: JsonOpt = False) -> None:
    """Print the checksum of snapshot NAME's data."""
    data = _call("GET", url, f"/v1/snapshots/{name}/checksum")
    if not emit(data, json_out):
        typer.echo(f"{data['checksum']}  {name}")
