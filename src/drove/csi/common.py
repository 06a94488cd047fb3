"""What the Controller and Node services share: per-volume locks, manager look-ups, a
volume's condition and publication, paging, a volume attached for the length of a call."""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from drove.cli.client import Manager, ManagerError
from drove.csi.errors import CsiError, invalid
from drove.csi.proto import pb


class VolumeLocks:
    """One lock per volume name: calls on one volume run one at a time in this process."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        """Hold ``name``'s lock for the block."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            yield


def get_or_none(mgr: Manager, path: str, **params: Any) -> Any:
    """GET ``path``; None when the manager says 404."""
    try:
        return mgr.get(path, **params)
    except ManagerError as exc:
        if exc.status == 404:
            return None
        raise


def condition(view: dict[str, Any]) -> Any:
    """The VolumeCondition of a volume's view: abnormal unless healthy."""
    health = view.get("health") or "unknown"
    if health == "healthy":
        return pb.VolumeCondition(abnormal=False, message="healthy: every replica is RW")
    bad = [f"{r['name']} {r.get('mode') or r.get('state')}" for r in view.get("replicas", [])
           if r.get("mode") != "RW"]
    return pb.VolumeCondition(abnormal=True, message=f"{health}"
                              + (f": {', '.join(bad)}" if bad else ""))


def published_on(view: dict[str, Any]) -> list[str]:
    """The nodes a volume is published on (attached there)."""
    return [view["node"]] if view.get("state") == "attached" and view.get("node") else []


TOKEN_PREFIX = "from:"


def page(items: list[Any], keys: list[str], max_entries: int,
         token: str) -> tuple[list[Any], str]:
    """One page of ``items`` (sorted by their ``keys``) from ``token``, and the next token.

    A token names the key the next page starts at, so an item deleted or added between two
    calls never makes one skip or repeat another; ABORTED for a token this driver never
    gives."""
    if max_entries < 0:
        raise invalid(f"max_entries {max_entries} must not be negative")
    start = 0
    if token:
        if not token.startswith(TOKEN_PREFIX):
            raise CsiError(grpc.StatusCode.ABORTED, f"starting_token {token!r} is not one "
                                                    "this driver gives")
        start = bisect.bisect_left(keys, token[len(TOKEN_PREFIX):])
    end = len(items) if not max_entries else min(len(items), start + max_entries)
    return items[start:end], (TOKEN_PREFIX + keys[end] if end < len(items) else "")


@contextlib.contextmanager
def attached(mgr: Manager, volume: str) -> Iterator[None]:
    """The volume attached for the block (a detached one attached on the manager's node,
    no device, and detached again): the manager snapshots and clones through its engine."""
    view = mgr.get(f"/v1/volumes/{volume}")
    if view.get("state") == "attached":
        yield
        return
    mgr.post(f"/v1/volumes/{volume}/attach", {})
    try:
        yield
    finally:
        mgr.post(f"/v1/volumes/{volume}/detach", {})
