"""The manager's state on etcd: the same narrow document store as ``SqliteStore``.

Layout under a prefix (default ``/drove``)::

    <prefix>/objects/<kind>/<key>          the JSON document; ``_version`` = etcd's key version
    <prefix>/events/all/<uid>              one event (JSON), id = the key's create revision
    <prefix>/events/vol/<volume>/<uid>     the same event, written in the same transaction

Both event keys are written by one transaction, so they share one create revision: the
event's id, which only grows, so ``events(after=...)`` works like SQLite's row ids.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception

from drove.manager.store import (
    ConflictError,
    OnChange,
    OnReset,
    SqliteStore,
    Store,
    StoreError,
)

log = logging.getLogger("drove.cluster.etcdstore")

DEFAULT_PREFIX = "/drove"
MAX_EVENTS = 10_000
"""Events kept; older ones are trimmed (SQLite keeps them all, etcd is not a log store)."""
TRIM_EVERY = 100
"""Appends between two checks of the event count."""
REQUEST_TIMEOUT = 5.0
WATCH_IDLE = 10.0
"""Seconds a watch stream may stay silent before it is made again (from where it was):
a member that died without closing the connection is left within this time."""
WATCH_RETRY = 1.0
"""Seconds between two attempts to make a watch while etcd does not answer."""

T = TypeVar("T")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _prefix_end(prefix: str) -> str:
    """The first key after every key starting with ``prefix`` (etcd's range end)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class Endpoints:
    """Several etcd endpoints behind one call: a call goes to the first that answers."""

    def __init__(self, endpoints: list[tuple[str, int]], timeout: float = REQUEST_TIMEOUT) -> None:
        if not endpoints:
            raise StoreError("no etcd endpoint given")
        self.endpoints = list(endpoints)
        self._clients = [Etcd3Client(host=h, port=p, timeout=timeout, api_path="/v3/")
                         for h, p in endpoints]
        self._first = 0
        self._lock = threading.Lock()

    def describe(self) -> str:
        """The endpoints as ``host:port,host:port``."""
        return ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def current(self) -> Etcd3Client:
        """The client that answered last."""
        return self._clients[self._first]

    def call(self, fn: Callable[[Etcd3Client], T]) -> T:
        """``fn(client)`` on the first endpoint that answers; StoreError when none does."""
        start = self._first
        errors: list[str] = []
        for i in range(len(self._clients)):
            index = (start + i) % len(self._clients)
            try:
                result = fn(self._clients[index])
            except (ConnectionFailedError, ConnectionTimeoutError) as exc:
                # A refused connection applied nothing. A timeout after sending may have
                # applied it: the retry elsewhere then repeats a plain put or an event, or
                # reports a CAS put as a conflict (the caller re-reads, as for any conflict).
                errors.append(f"{self._describe(index)}: {type(exc).__name__}")
                continue
            except Etcd3Exception as exc:
                raise StoreError(f"etcd {self._describe(index)} refused the request: "
                                 f"{exc.detail_text or exc}") from exc
            if index != self._first:
                with self._lock:
                    self._first = index
            return result
        raise StoreError(f"etcd unreachable at {self.describe()} ({'; '.join(errors)})")

    def _describe(self, index: int) -> str:
        host, port = self.endpoints[index]
        return f"{host}:{port}"

    def close(self) -> None:
        """Close every endpoint's HTTP session."""
        for client in self._clients:
            client.session.close()

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload`` to the v3 JSON gateway path (``kv/range``, ``kv/txn``...)."""
        return self.call(lambda c: c.post(c.get_url(path), json=payload))


class EtcdStore:
    """The manager's documents and events in etcd (see the module docstring for the layout)."""

    def __init__(self, endpoints: list[tuple[str, int]], prefix: str = DEFAULT_PREFIX) -> None:
        self.etcd = Endpoints(endpoints)
        self.prefix = prefix.rstrip("/")
        self._appends = 0
        self._lock = threading.Lock()
        self._watches: list[KindWatch] = []
        # Fail at start, with the endpoints named, rather than at the first request.
        self.etcd.post("kv/range", {"key": _b64(self.prefix + "/"), "count_only": True})

    def key_of(self, kind: str, key: str) -> str:
        """The etcd key of document ``key`` of ``kind``."""
        return self._key(kind, key)

    def _key(self, kind: str, key: str) -> str:
        if not kind or "/" in kind:
            raise StoreError(f"bad kind {kind!r}")
        return f"{self.prefix}/objects/{kind}/{key}"

    def _range(self, prefix: str, **extra: Any) -> list[dict[str, Any]]:
        payload = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)), **extra}
        return list(self.etcd.post("kv/range", payload).get("kvs", []))

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        """The document, or None."""
        kvs = self.etcd.post("kv/range", {"key": _b64(self._key(kind, key))}).get("kvs", [])
        return _doc(kvs[0]) if kvs else None

    def list(self, kind: str) -> list[dict[str, Any]]:
        """Every document of ``kind``, ordered by key."""
        kvs = self._range(self._key(kind, ""), sort_order="ASCEND", sort_target="KEY")
        return [_doc(kv) for kv in kvs]

    def put(self, kind: str, key: str, doc: dict[str, Any],
            expect_version: int | None = None) -> int:
        """Store ``doc``; with ``expect_version`` (0: must not exist) only if it still matches."""
        path = _b64(self._key(kind, key))
        body = {k: v for k, v in doc.items() if k != "_version"}
        text = json.dumps(body, sort_keys=True)
        compare = [] if expect_version is None else [
            {"key": path, "target": "VERSION", "result": "EQUAL",
             "version": str(expect_version)}]
        # The range after the put reads the version the put made, in the same transaction.
        txn = {"compare": compare,
               "success": [{"request_put": {"key": path, "value": _b64(text)}},
                           {"request_range": {"key": path}}],
               "failure": [{"request_range": {"key": path}}]}
        result = self.etcd.post("kv/txn", txn)
        responses = result.get("responses", [])
        if not result.get("succeeded"):
            kvs = responses[0].get("response_range", {}).get("kvs", []) if responses else []
            have = int(kvs[0].get("version", 0)) if kvs else 0
            raise ConflictError(f"{kind} {key!r} changed (version {have}, "
                                f"expected {expect_version})")
        version = int(responses[1]["response_range"]["kvs"][0]["version"])
        doc["_version"] = version
        return version

    def delete(self, kind: str, key: str) -> bool:
        """Remove the document; False if there was none."""
        result = self.etcd.post("kv/deleterange", {"key": _b64(self._key(kind, key))})
        return int(result.get("deleted", 0)) > 0

    def append_event(self, level: str, kind: str, volume: str | None, message: str) -> int:
        """Append one event; its id (the etcd revision that wrote it)."""
        uid = uuid.uuid4().hex
        event = {"time": time.time(), "level": level, "kind": kind, "volume": volume,
                 "message": message}
        value = _b64(json.dumps(event))
        ops = [{"request_put": {"key": _b64(f"{self.prefix}/events/all/{uid}"),
                                "value": value}}]
        if volume is not None:
            ops.append({"request_put": {"key": _b64(self._volume_events(volume) + uid),
                                        "value": value}})
        result = self.etcd.post("kv/txn", {"compare": [], "success": ops, "failure": []})
        with self._lock:
            self._appends += 1
            trim = self._appends % TRIM_EVERY == 0
        if trim:
            self.trim_events()
        return int(result["header"]["revision"])

    def _volume_events(self, volume: str) -> str:
        # Quoted so that volume "a" never sees the events of a volume "a/b".
        return f"{self.prefix}/events/vol/{quote(volume, safe='')}/"

    def events(self, volume: str | None = None, limit: int = 100,
               after: int = 0) -> list[dict[str, Any]]:
        """The newest ``limit`` events (of ``volume``) with id > ``after``, oldest first."""
        if limit <= 0:
            return []
        prefix = (f"{self.prefix}/events/all/" if volume is None
                  else self._volume_events(volume))
        kvs = self._range(prefix, sort_order="DESCEND", sort_target="CREATE", limit=limit,
                          min_create_revision=after + 1)
        out = []
        for kv in reversed(kvs):
            event = json.loads(_unb64(kv["value"]))
            out.append({"id": int(kv["create_revision"]), "time": _iso(event["time"]),
                        "level": event["level"], "kind": event["kind"],
                        "volume": event["volume"], "message": event["message"]})
        return out

    def trim_events(self, keep: int = MAX_EVENTS) -> int:
        """Delete the oldest events beyond ``keep``; how many were deleted."""
        prefix = f"{self.prefix}/events/all/"
        count = int(self.etcd.post("kv/range", {
            "key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)),
            "count_only": True}).get("count", 0))
        if count <= keep:
            return 0
        old = self._range(prefix, sort_order="ASCEND", sort_target="CREATE",
                          limit=count - keep)
        for kv in old:
            key = _unb64(kv["key"])
            volume = json.loads(_unb64(kv["value"])).get("volume")
            ops = [{"request_delete_range": {"key": kv["key"]}}]
            if volume is not None:
                uid = key.rsplit("/", 1)[1]
                ops.append({"request_delete_range": {
                    "key": _b64(self._volume_events(volume) + uid)}})
            self.etcd.post("kv/txn", {"compare": [], "success": ops, "failure": []})
        return len(old)

    def watch(self, kind: str) -> tuple[Iterator[tuple[str, str, dict[str, Any] | None]],
                                        Callable[[], None]]:
        """Changes to documents of ``kind`` from now on: an iterator and a cancel function.

        The iterator yields ``("put", key, doc)`` and ``("delete", key, None)``.
        """
        base = self._key(kind, "")
        events, cancel = self.etcd.call(lambda c: c.watch_prefix(base))

        def changes() -> Iterator[tuple[str, str, dict[str, Any] | None]]:
            for event in events:
                kv = event["kv"]
                key = kv["key"].decode() if isinstance(kv["key"], bytes) else str(kv["key"])
                key = key[len(base):]
                if event.get("type") == "DELETE":
                    yield ("delete", key, None)
                else:
                    value = kv.get("value", b"")
                    doc = json.loads(value.decode() if isinstance(value, bytes) else value)
                    doc["_version"] = int(kv.get("version", 0))
                    yield ("put", key, doc)

        return changes(), cancel

    def subscribe(self, kind: str, on_reset: OnReset, on_change: OnChange
                  ) -> Callable[[], None]:
        """Follow the documents of ``kind`` through an etcd watch, in a thread (see
        :class:`drove.manager.store.Store`); revisions are etcd's."""
        watch = KindWatch(self, kind, on_reset, on_change)
        with self._lock:
            self._watches.append(watch)
        watch.start()
        return watch.stop

    def close(self) -> None:
        """Stop the watches; release the HTTP sessions."""
        with self._lock:
            watches, self._watches = self._watches, []
        for watch in watches:
            watch.stop()
        self.etcd.close()


class _Compacted(Exception):
    """The revision a watch resumes from is compacted away: changes may have been missed."""


class KindWatch:
    """One kind's documents followed through etcd's watch (a thread): a snapshot, then each
    change in order; after a compaction, a new snapshot (nothing is missed silently)."""

    def __init__(self, store: EtcdStore, kind: str, on_reset: OnReset,
                 on_change: OnChange) -> None:
        self._store = store
        self._base = store.key_of(kind, "")
        self._on_reset = on_reset
        self._on_change = on_change
        self._stop = threading.Event()
        self._resume: int | None = None  # the next revision to hear of; None: snapshot first
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def stop(self) -> None:
        """Stop following (the thread ends within ``WATCH_IDLE`` s; it is a daemon)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._resume is None:
                    self._resume = self._snapshot() + 1
                self._follow()
            except _Compacted:
                log.warning("watch on %s: history compacted; reading it again", self._base)
                self._resume = None
            except (StoreError, OSError, ValueError, KeyError) as exc:
                # requests' errors are OSErrors; etcd away or the stream cut: make it again,
                # from where it was (etcd keeps the history).
                log.warning("watch on %s: %s", self._base, exc)
                self._stop.wait(WATCH_RETRY)

    def _snapshot(self) -> int:
        """Tell every document as of one revision; that revision."""
        payload = {"key": _b64(self._base), "range_end": _b64(_prefix_end(self._base))}
        answer = self._store.etcd.post("kv/range", payload)
        revision = int(answer["header"]["revision"])
        docs = {_unb64(kv["key"])[len(self._base):]: _doc(kv) for kv in answer.get("kvs", [])}
        self._on_reset(revision, docs)
        return revision

    def _open(self, start: int) -> requests.Response:
        """The watch stream from revision ``start``, on the first endpoint that answers."""
        request = {"create_request": {"key": _b64(self._base),
                                      "range_end": _b64(_prefix_end(self._base)),
                                      "start_revision": start}}

        def post(client: Etcd3Client) -> requests.Response:
            try:
                resp = client.session.post(client.get_url("/watch"), json=request,
                                           stream=True, timeout=(3.0, WATCH_IDLE))
            except requests.ConnectionError as exc:  # so that the next endpoint is tried
                raise ConnectionFailedError(str(exc)) from exc
            if resp.status_code != 200:
                resp.close()
                raise StoreError(f"etcd refused the watch: {resp.status_code}")
            return resp

        return self._store.etcd.call(post)

    def _follow(self) -> None:
        """Tell each change from the resume revision on until the stream ends or stays
        silent for ``WATCH_IDLE`` s (the resume revision follows each change told)."""
        assert self._resume is not None
        resp = self._open(self._resume)
        buffered = b""
        try:
            for chunk in resp.iter_content(chunk_size=None):
                if self._stop.is_set():
                    break
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._message(json.loads(line))
        except requests.ConnectionError:  # silent for WATCH_IDLE s (or cut): make it again
            pass
        finally:
            resp.close()

    def _message(self, message: dict[str, Any]) -> None:
        """Tell the changes one stream message carries."""
        if "error" in message:
            raise StoreError(f"etcd watch: {message['error']}")
        result = message.get("result", {})
        if int(result.get("compact_revision", 0) or 0) > 0:
            raise _Compacted()
        if result.get("canceled"):
            raise StoreError(f"etcd cancelled the watch: {result.get('cancel_reason')}")
        for event in result.get("events", []):
            kv = event["kv"]
            key = _unb64(kv["key"])[len(self._base):]
            revision = int(kv["mod_revision"])
            if event.get("type") == "DELETE":
                self._on_change(revision, key, None)
            else:
                self._on_change(revision, key, _doc(kv))
            self._resume = revision + 1


def _doc(kv: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_unb64(kv["value"]))
    doc["_version"] = int(kv.get("version", 0))
    return doc


def parse_etcd_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """``etcd://h1:2379,h2:2379[/prefix]`` as (endpoints, prefix); StoreError when malformed."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.netloc:
        raise StoreError(f"bad store URL {url!r}: expected etcd://HOST:PORT[,HOST:PORT...]"
                         "[/prefix]")
    if parts.query or parts.fragment:
        raise StoreError(f"bad store URL {url!r}: no query or fragment allowed")
    endpoints = []
    for item in parts.netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, "2379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreError(f"bad store URL {url!r}: {item!r} is not HOST:PORT")
        endpoints.append((host, int(port)))
    prefix = parts.path.rstrip("/") or DEFAULT_PREFIX
    return endpoints, prefix


def from_url(url: str | None, data_dir: Path) -> Store:
    """The store a ``--store`` value names: SQLite in ``data_dir`` by default, or etcd."""
    if url is None or url in ("", "sqlite", "sqlite://"):
        return SqliteStore(data_dir / "drove.db")
    if url.startswith("sqlite://"):
        path = Path(url[len("sqlite://"):])
        if not path.name:
            raise StoreError(f"bad store URL {url!r}: expected sqlite:///PATH/FILE.db")
        return SqliteStore(path)
    endpoints, prefix = parse_etcd_url(url)
    return EtcdStore(endpoints, prefix)
