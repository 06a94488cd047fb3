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
