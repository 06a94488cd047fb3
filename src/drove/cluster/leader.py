"""Leader election on etcd: one holder of ``<prefix>/leader``, bound to a lease it keeps alive.

A candidate creates the key only if it is absent (a transaction comparing its create
revision with 0), attached to a lease of ``ttl`` seconds. The leader refreshes the lease
every ``ttl / 3`` s; if it dies or is cut off, etcd expires the lease, deletes the key, and
the next candidate to look creates it. A leader that cannot refresh steps down by itself
before etcd could expire its lease, so two managers never both believe they lead.

A follower does not poll the key: it watches it (from the revision it read, so no change
is missed) and campaigns as soon as etcd deletes it, or looks again after ``ttl / 3`` s.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import WatchTimedOut

from drove.cluster.etcdstore import DEFAULT_PREFIX, Endpoints
from drove.manager.store import StoreError

log = logging.getLogger("drove.cluster.leader")

STEP_DOWN_FRACTION = 0.7
"""A leader that has not refreshed its lease for this part of ``ttl`` stops leading."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Leadership:
    """Campaign for ``<prefix>/leader`` under ``name`` (a manager's name or URL) in a thread."""

    def __init__(self, endpoints: Endpoints | list[tuple[str, int]], name: str,
                 prefix: str = DEFAULT_PREFIX, ttl: int = 5,
                 on_change: Callable[[bool], None] | None = None) -> None:
        if ttl < 2:
            raise ValueError("ttl must be at least 2 s")
        self.etcd = endpoints if isinstance(endpoints, Endpoints) else Endpoints(endpoints)
        self.name = name
        self.key = prefix.rstrip("/") + "/leader"
        self.ttl = ttl
        self.on_change = on_change
        self._lease: int | None = None
        self._last_refresh = 0.0  # monotonic time a successful refresh was *sent*
        self._leading = False
        self._seen: str | None = None  # the holder the last look at the key found
        self._seen_revision: int | None = None  # etcd's revision at that look
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        """True while this candidate holds the key with a lease it refreshed recently."""
        return self._leading and (time.monotonic() - self._last_refresh
                                  < self.ttl * STEP_DOWN_FRACTION)

    def leader(self) -> str | None:
        """The current holder's name, or None when nobody leads (StoreError: etcd down)."""
        answer = self.etcd.post("kv/range", {"key": _b64(self.key)})
        kvs = answer.get("kvs", [])
        self._seen = base64.b64decode(kvs[0]["value"]).decode() if kvs else None
        self._seen_revision = int(answer.get("header", {}).get("revision", 0)) or None
        return self._seen

    @property
    def known_leader(self) -> str | None:
        """The leader as this candidate last saw it (no etcd call; at most ``ttl / 3`` s old)."""
        return self.name if self.is_leader else None if self._leading else self._seen

    def start(self) -> Leadership:
        """Start campaigning (and, once leading, keeping the lease alive) in the background."""
        self._thread = threading.Thread(target=self._run, name=f"leader-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop campaigning; a leader gives the key up at once (revokes its lease)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.ttl * 2)
        lease, self._lease = self._lease, None
        self._set_leading(False)
        if lease is not None:
            try:
                self.etcd.post("kv/lease/revoke", {"ID": lease})
            except StoreError as exc:  # etcd expires it after ttl anyway
                log.warning("could not revoke the leader lease: %s", exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._leading:
                    self._refresh()
                else:
                    self._campaign()
            except StoreError as exc:
                log.warning("leader election: %s", exc)
            if self._leading and not self.is_leader:
                log.warning("%s: lease not refreshed in time; stepping down", self.name)
                self._lost()
            if self._leading or self._seen is None or not self._watch_leader():
                self._stop.wait(self.ttl / 3)

    def _campaign(self) -> None:
        if self.leader() is not None:
            return
        sent = time.monotonic()
        lease = int(self.etcd.post("lease/grant", {"TTL": self.ttl})["ID"])
        key = _b64(self.key)
        result = self.etcd.post("kv/txn", {
            "compare": [{"key": key, "target": "CREATE", "result": "EQUAL",
                         "create_revision": "0"}],
            "success": [{"request_put": {"key": key, "value": _b64(self.name),
                                         "lease": lease}}],
            "failure": []})
        if result.get("succeeded"):
            self._lease, self._last_refresh, self._seen = lease, sent, self.name
            log.info("%s leads", self.name)
            self._set_leading(True)
        else:  # someone else was quicker: our lease has nothing to keep
            self.etcd.post("kv/lease/revoke", {"ID": lease})

    def _watch_leader(self) -> bool:
        """Follower: wait up to ``ttl / 3`` s for the leader key to change; False if the
        watch could not be made (the caller then waits by the clock)."""
        revision = self._seen_revision
        if revision is None or self._stop.is_set():
            return False
        def watch(client: Etcd3Client) -> None:
            # Inside the call: Endpoints.call would report the timeout (an Etcd3Exception)
            # as a refusal.
            with contextlib.suppress(WatchTimedOut):  # nothing changed: look again anyway
                client.watch_once(self.key, timeout=self.ttl / 3, start_revision=revision + 1)

        try:
            self.etcd.call(watch)
        except (StoreError, OSError) as exc:  # requests' errors are OSErrors
            log.warning("watching the leader key: %s", exc)
            return False
        return True

    def _refresh(self) -> None:
        sent = time.monotonic()
        result = self.etcd.post("lease/keepalive", {"ID": self._lease}).get("result", {})
        # An expired lease comes back without a TTL; a deleted key means it is gone too.
        kvs = self.etcd.post("kv/range", {"key": _b64(self.key)}).get("kvs", [])
        if int(result.get("TTL", -1)) <= 0 or not kvs or int(kvs[0].get("lease", 0)) != \
                self._lease:
            log.warning("%s lost the leadership", self.name)
            self._lost()
            return
        self._last_refresh = sent

    def _lost(self) -> None:
        self._lease, self._seen = None, None
        self._set_leading(False)

    def _set_leading(self, leading: bool) -> None:
        changed = leading != self._leading
        self._leading = leading
        if changed and self.on_change is not None:
            self.on_change(leading)
