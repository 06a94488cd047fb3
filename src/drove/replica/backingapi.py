"""The replica's control API for an instant restore: install a backing layer, its fill.

``POST /v1/backing`` puts a backup under a fresh replica's empty head (the replica
reads the backup's block map from the target itself, so the body stays small) and
starts the background fill; ``GET /v1/backing`` says how far the fill is;
``POST /v1/backing/retry`` tries failed blocks again now.  The target's config,
secret included, travels in the body of a fenced call and is kept in the replica
directory with mode 0600, never on a command line.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from drove.backup.errors import BackupError
from drove.replica import backing as bk
from drove.replica.errors import InvalidRequestError
from drove.web import App, Body, Field

log = logging.getLogger("drove.replica")

INSTALL = Body("BackingInstall", {
    "name": Field("str", description="the snapshot name the backup's layer gets"),
    "backup": Field("str", description="the backup to restore"),
    "target": Field("dict", description="the backup target: url, endpoint, region, "
                                        "access_key, secret_key"),
    "fill_rate": Field("int", default=0,
                       description="bytes per second the background fill fetches at most "
                                   "(0: no limit)"),
}, "Put a backup under this fresh replica's empty head, fetched as it is read.")


ADOPT = Body("BackingAdopt", {
    "layer": Field("str", description="the incomplete bottom layer a rebuild prepared"),
    "backup": Field("str", description="the backup the source fills that layer from"),
    "target": Field("dict", description="the backup target (as POST /v1/backing)"),
    "fill_rate": Field("int", default=0, description="bytes per second (0: no limit)"),
}, "Fetch a layer from its backup rather than from the rebuild's source.")


def start_fill(replica: Any) -> None:
    """Start the background fill of ``replica``'s backing layer, if it has one."""
    b = replica.backing
    if b is None:
        return

    def finish() -> None:
        try:
            replica.finish_backing()
        except Exception:  # the replica failed meanwhile: the next open tries again
            log.exception("%s: could not finish the backing layer", replica.dir)

    b.start_fill(finish)


async def stop_fill(replica: Any) -> None:
    """Stop the fill of ``replica`` (before it closes), keeping what it fetched."""
    b = replica.backing
    if b is not None:
        await b.stop_fill()


def status(replica: Any) -> dict[str, Any]:
    """The fill's progress; ``{"done": true}`` once the replica has no backing layer."""
    b = replica.backing
    if b is None:
        return {"done": True}
    return b.status()


def add_routes(app: App, control: Any) -> None:
    """Serve the backing calls on ``app`` (the replica's control API, fenced by its guard)."""

    @app.post("/v1/backing", status=201, body=INSTALL)
    async def install(body: Any) -> dict[str, Any]:
        """Put a backup under the empty head and start fetching it."""
        target = {k: body.target.get(k) for k in bk.TARGET_KEYS}
        if body.fill_rate < 0:
            raise InvalidRequestError("fill_rate must not be negative")
        if not isinstance(target["url"], str) or not target["url"]:
            raise InvalidRequestError("target.url is required")
        try:
            size, blocks = await asyncio.to_thread(bk.read_manifest, target, body.backup)
        except (BackupError, ValueError) as exc:
            raise InvalidRequestError(f"backup {body.backup}: {exc}") from None
        replica = control.replica
        info = replica.install_backing(body.name, body.backup, target, size, blocks,
                                       body.fill_rate)
        start_fill(replica)
        log.info("%s: backup %s installed as snapshot %s (%d blocks)", replica.dir,
                 body.backup, body.name, len(blocks))
        return {"layer": info.file, **status(replica)}

    @app.post("/v1/backing/export")
    async def export() -> dict[str, Any]:
        """What a rebuild target needs to fetch the backing layer itself (the target's
        secret included: a POST, so only the engine owning the replica gets it)."""
        b = control.replica.backing
        if b is None or not b.active:
            return {"done": True}
        return {"done": False, "layer": b.layer, "backup": b.cfg.backup,
                "target": b.cfg.target, "fill_rate": b.cfg.rate}

    @app.post("/v1/backing/adopt", body=ADOPT)
    async def adopt(body: Any) -> dict[str, Any]:
        """Make a rebuild's incomplete bottom layer fetch from its backup (see export)."""
        target = {k: body.target.get(k) for k in bk.TARGET_KEYS}
        try:
            size, blocks = await asyncio.to_thread(bk.read_manifest, target, body.backup)
        except (BackupError, ValueError) as exc:
            raise InvalidRequestError(f"backup {body.backup}: {exc}") from None
        replica = control.replica
        replica.adopt_backing(body.layer, body.backup, target, size, blocks,
                              max(0, body.fill_rate))
        start_fill(replica)
        log.info("%s: layer %s is fetched from backup %s (a rebuild)", replica.dir,
                 body.layer, body.backup)
        return status(replica)

    @app.get("/v1/backing")
    async def get_status() -> dict[str, Any]:
        """How far the fill is (``done`` once the layer is ordinary)."""
        return status(control.replica)

    @app.post("/v1/backing/retry")
    async def retry() -> dict[str, Any]:
        """Try the blocks that failed again now."""
        b = control.replica.backing
        if b is not None:
            b.retry_now()
        return status(control.replica)
