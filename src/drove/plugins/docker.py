"""`drove plugin docker`: the Docker volume plugin protocol over HTTP on a unix socket.

Docker finds the plugin by its socket, ``/run/docker/plugins/drove.sock``; Podman by
``[engine.volume_plugins] drove = "/run/docker/plugins/drove.sock"`` in containers.conf.
Both POST JSON to ``/Plugin.Activate`` and ``/VolumeDriver.*`` (Create, Remove, Mount,
Unmount, Path, Get, List, Capabilities) and read ``Err`` in the answer: an error is
answered 500 with ``{"Err": message}`` (what Docker's plugin helpers send, and what
both engines show to the user), a success 200 with ``"Err": ""``.

The HTTP server is drove.web's (h11); what each call does is
:mod:`drove.plugins.dockerdriver`'s; the mounts outlive the plugin in
:mod:`drove.plugins.mountstate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

from drove import __version__
from drove.plugins.dockerdriver import DockerDriver, DriverError
from drove.web import App, Body, Field, HttpServer, Request, Response, json_response

log = logging.getLogger("drove.plugin.docker")

DEFAULT_SOCKET = "/run/docker/plugins/drove.sock"

NAMED = Body("VolumeName", {"Name": Field("str")}, "A volume, by name.")
CREATE = Body("VolumeCreate", {
    "Name": Field("str"),
    "Opts": Field("dict", nullable=True, default=None,
                  description="--opt NAME=VALUE of `docker volume create`"),
}, "A volume to create.")
MOUNT = Body("VolumeMount", {
    "Name": Field("str"),
    "ID": Field("str", default="", description="the mount's ID (one per container)"),
}, "A volume a container mounts or unmounts.")


def build_app(driver: DockerDriver) -> App:
    """The plugin's routes over ``driver``."""
    app = App(title="drove Docker volume plugin", version=__version__,
              description="The Docker volume plugin protocol, served by drove.")

    @app.exception_handler(DriverError)
    def _refused(request: Request, exc: DriverError) -> Response:
        log.info("%s refused: %s", request.path, exc)
        return json_response(500, {"Err": str(exc)})

    @app.post("/Plugin.Activate")
    async def activate() -> dict[str, Any]:
        """The plugin's kinds: a volume driver."""
        return {"Implements": ["VolumeDriver"]}

    @app.post("/VolumeDriver.Capabilities")
    async def capabilities() -> dict[str, Any]:
        """Scope global: a volume is the same on every host (the manager's)."""
        return {"Capabilities": {"Scope": "global"}}

    @app.post("/VolumeDriver.Create", body=CREATE)
    async def create(body: Any) -> dict[str, Any]:
        """Create a volume; options as `docker volume create --opt` gives them."""
        await driver.create(body.Name, body.Opts)
        return {"Err": ""}

    @app.post("/VolumeDriver.Remove", body=NAMED)
    async def remove(body: Any) -> dict[str, Any]:
        """Delete a volume no container here uses."""
        await driver.remove(body.Name)
        return {"Err": ""}

    @app.post("/VolumeDriver.Mount", body=MOUNT)
    async def mount(body: Any) -> dict[str, Any]:
        """Mount a volume here for a container; the path."""
        return {"Mountpoint": await driver.mount(body.Name, body.ID), "Err": ""}

    @app.post("/VolumeDriver.Unmount", body=MOUNT)
    async def unmount(body: Any) -> dict[str, Any]:
        """A container is done with a volume."""
        await driver.unmount(body.Name, body.ID)
        return {"Err": ""}

    @app.post("/VolumeDriver.Path", body=NAMED)
    async def path(body: Any) -> dict[str, Any]:
        """Where a volume is mounted here ('' when it is not)."""
        return {"Mountpoint": await driver.path(body.Name), "Err": ""}

    @app.post("/VolumeDriver.Get", body=NAMED)
    async def get(body: Any) -> dict[str, Any]:
        """One volume."""
        return {"Volume": await driver.get(body.Name), "Err": ""}

    @app.post("/VolumeDriver.List")
    async def list_volumes() -> dict[str, Any]:
        """Every volume."""
        return {"Volumes": await driver.list(), "Err": ""}

    return app


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` (a stale socket file of a dead plugin is
    replaced; a live one, answering connections, is refused)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left by a plugin that died
        else:
            raise OSError(f"{path} is served by another process (a plugin running already?)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o660)  # dockerd runs as root; the API it opens is root's to use
    sock.listen(128)
    return sock


async def serve(driver: DockerDriver, sock_path: Path, stop: asyncio.Future[Any],
                ready: Any = None) -> None:
    """Serve the plugin on ``sock_path`` until ``stop`` is done."""
    for line in await driver.recover():
        log.info("recovered: %s", line)
    sock = bind_unix(sock_path)
    server = HttpServer(build_app(driver), sock)
    await server.start()
    log.info("serving the Docker volume plugin on %s (node %s)", sock_path, driver.node)
    if ready is not None:
        ready({"socket": str(sock_path), "node": driver.node})
    try:
        await stop
    finally:
        await server.stop()
        sock.close()
        with contextlib.suppress(OSError):
            sock_path.unlink()
