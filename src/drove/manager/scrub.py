"""Scrub and repair (bit-rot): compare the replicas' snapshot layers, repair a bad copy.

For every snapshot layer all RW replicas of an attached volume hold, each
replica digests the layer range by range where the data is (GET
``/v1/layers/FILE/digests``, in its worker threads): only digests cross the
network.  Where a range's digests differ, the good copy is the majority's; with
no majority (two replicas) it is the replica whose layer still hashes to the
checksum recorded in its metadata (GET ``/v1/layers/FILE/rehash``).  A layer
has one recorded sha256, no per-range record: a range is located by the
digests, and deciding needs only "which copy is intact", which the layer's
hash answers.  A scrub records that checksum on every replica for each layer
they all agree on, so the next scrub of a two-replica volume can decide.

The bad replica then repairs the range itself from the good one's layer
export (POST ``/v1/layers/FILE/repair``, epoch-checked, refused if either
side's range changed since it was compared), and reports the 4 KiB blocks it
rewrote.  The head is not compared: it changes under writes in flight.  A scrub
asked to (``snapshot``; every run of a ``scrub`` job) snapshots the head
first, so what the volume held then is compared in that snapshot's layer.  No
lock of the volume is held across the scrub: each repair is atomic on its
replica.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from drove.manager.engines import Engines
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.records import Records
from drove.manager.tasks import TaskContext, TaskFailed, TaskFn
from drove.replica.fence import EPOCH_HEADER

RANGE = 1 << 20
"""Bytes one digest covers (and one repair at most)."""

KIND = "volume-scrub"
"""The kind of a scrub's task."""

LABEL = "drove.scrub"
"""Label on the snapshot a scrub takes of the head before comparing."""

SnapshotFn = Callable[[str, str, dict[str, str]], Awaitable[dict[str, Any]]]


class _Member:
    """One replica taking part in a scrub: where its API and exports are."""

    def __init__(self, name: str, ends: dict[str, Any], epoch: int) -> None:
        self.name = name
        self.control = ends["control"]
        self.nbd = ends["nbd"]
        self.headers = {**(ends.get("headers") or {}), EPOCH_HEADER: str(epoch)}


class Scrubber:
    """Scrubs attached volumes (as tasks, run by the API and by jobs of kind ``scrub``)."""

    def __init__(self, *, records: Records, engines: Engines, event: EventFn,
                 snapshot: SnapshotFn) -> None:
        self._records = records
        self._engines = engines
        self._event = event
        self._snapshot = snapshot  # (volume, name, labels): snapshot the head

    def check(self, name: str) -> dict[str, Any]:
        """Refuse what cannot be scrubbed now (ApiError 404, 409); the volume's document."""
        doc = self._records.get(name)
        if doc["state"] != "attached":
            raise ApiError(409, f"volume {name} is {doc['state']}: a scrub compares the "
                                f"replicas through their running processes; attach it first "
                                f"(`drove volume attach {name}`)")
        if len(doc["replicas"]) < 2:
            raise ApiError(409, f"volume {name} has one replica: a scrub compares replicas; "
                                f"add one first (`drove volume update {name} --replicas 2`)")
        return doc

    def task(self, name: str, snapshot: dict[str, str] | None = None) -> TaskFn:
        """The task that scrubs volume ``name`` and repairs what it finds; with
        ``snapshot`` (its labels), it snapshots the head first so its data is compared."""
        async def run(ctx: TaskContext) -> dict[str, Any]:
            taken = None
            if snapshot is not None:
                self.check(name)
                stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
                taken = (await self._snapshot(name, f"scrub-{stamp}-{secrets.token_hex(2)}",
                                              {**snapshot, LABEL: "true"}))["name"]
                ctx.set(snapshot=taken)
            return {**await self._scrub(ctx, name), "snapshot": taken}
        return run

    async def _call(self, m: _Member, method: str, path: str, **kwargs: Any) -> Any:
        r = await self._engines.http.request(method, m.control + path, headers=m.headers,
                                             timeout=3600, **kwargs)
        if r.status_code >= 300:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(409, f"replica {m.name}: {method} {path}: {detail}")
        return r.json()

    async def _members(self, doc: dict[str, Any]) -> list[_Member]:
        info = await self._engines.refresh(doc) or {}
        modes = {r["name"]: r["mode"] for r in info.get("replicas", [])}
        out = []
        for r in doc["replicas"]:
            if modes.get(r["name"]) != "RW":
                continue
            ends = await self._engines.replica_endpoints(doc, r)
            if ends is not None:
                out.append(_Member(r["name"], ends, int(doc.get("epoch") or 0)))
        if len(out) < 2:
            raise TaskFailed(f"volume {doc['name']} has {len(out)} RW replica(s) served: a "
                             "scrub compares two or more")
        return out

    async def _scrub(self, ctx: TaskContext, name: str) -> dict[str, Any]:
        doc = self.check(name)
        members = await self._members(doc)
        trees = await asyncio.gather(*(self._call(m, "GET", "/v1/layers",
                                                  params={"removed": "true"})
                                       for m in members))
        layers = _common_layers(trees)
        total = sum(la["size"] for la in layers)
        ctx.progress(0, total)
        self._event("scrub-started", f"scrub of volume {name}: {len(layers)} snapshot "
                    f"layer(s) on replicas {', '.join(m.name for m in members)}", name)
        findings: list[dict[str, Any]] = []
        done = 0
        for la in layers:
            ctx.message(f"layer {la['file']} ({la['name'] or 'removed snapshot'})")
            findings += await self._layer(name, members, la)
            done += la["size"]
            ctx.progress(done, total)
        bad = [f for f in findings if not f["repaired"]]
        result = {"volume": name, "layers": len(layers), "bytes": total,
                  "replicas": [m.name for m in members], "findings": findings,
                  "repaired": len(findings) - len(bad), "unrepaired": len(bad)}
        if bad:
            self._event("scrub-failed", f"scrub of volume {name}: {len(bad)} range(s) differ "
                        "and could not be repaired: " + "; ".join(f["why"] for f in bad),
                        name, level="warning")
            raise TaskFailed(f"{len(bad)} range(s) differ and were not repaired", result)
        self._event("scrub-done", f"scrub of volume {name}: {len(layers)} layer(s), "
                    f"{total} bytes compared, {len(findings)} range(s) repaired", name)
        return result

    async def _layer(self, volume: str, members: list[_Member],
                     la: dict[str, Any]) -> list[dict[str, Any]]:
        """Compare one layer on every member, repair what differs; the findings."""
        file = la["file"]
        lists = await asyncio.gather(*(self._call(m, "GET", f"/v1/layers/{file}/digests",
                                                  params={"range_size": RANGE,
                                                          "idle": "true"})
                                       for m in members))
        digests = [r["digests"] for r in lists]
        rehashed: dict[str, dict[str, Any]] | None = None
        findings = []
        for i in range(len(digests[0])):
            column = [d[i] for d in digests]
            if len(set(column)) == 1:
                continue
            good, how = _majority(column)
            if good is None:
                if rehashed is None:
                    answers = await asyncio.gather(*(self._call(
                        m, "GET", f"/v1/layers/{file}/rehash") for m in members))
                    rehashed = {m.name: a for m, a in zip(members, answers, strict=True)}
                good, how = _by_checksum(column, [rehashed[m.name] for m in members])
            offset, length = i * RANGE, min(RANGE, la["size"] - i * RANGE)
            for k, m in enumerate(members):
                if good is not None and column[k] == column[good]:
                    continue
                findings.append(await self._repair(volume, la, m, members, good, how, column,
                                                   offset, length, k))
        if all(f["repaired"] for f in findings):
            # Repaired copies hash again: their recorded checksum went with the repair.
            await self._record(volume, members, la)
        return findings

    async def _repair(self, volume: str, la: dict[str, Any], bad: _Member,
                      members: list[_Member], good: int | None, how: str, column: list[str],
                      offset: int, length: int, k: int) -> dict[str, Any]:
        """Report one bad copy of a range and repair it from the good one."""
        file, snap = la["file"], la["name"] or "a removed snapshot"
        finding: dict[str, Any] = {
            "replica": bad.name, "layer": file, "snapshot": la["name"], "offset": offset,
            "length": length, "decided_by": how, "source": None, "blocks": [],
            "repaired": False, "why": ""}
        where = (f"replica {bad.name}'s layer {file} (snapshot {snap}) at offset {offset} "
                 f"(+{length})")
        if good is None:
            finding["why"] = f"{where} differs and no copy is known good ({how})"
            self._event("scrub-mismatch", f"volume {volume}: {finding['why']}", volume,
                        level="warning")
            return finding
        src = members[good]
        finding["source"] = src.name
        self._event("scrub-mismatch", f"volume {volume}: {where} differs from the good copy "
                    f"on {src.name} ({how}); repairing it", volume, level="warning")
        try:
            out = await self._call(bad, "POST", f"/v1/layers/{file}/repair", json={
                "offset": offset, "length": length, "source": f"{src.nbd}/layer/{file}",
                "expect": column[k], "expect_source": column[good]})
        except ApiError as exc:
            finding["why"] = f"{where}: the repair failed: {exc}"
            self._event("scrub-repair-failed", f"volume {volume}: {finding['why']}", volume,
                        level="warning")
            return finding
        finding.update(blocks=out["blocks"], repaired=bool(out["repaired"]))
        blocks = ", ".join(str(b) for b in out["blocks"][:8])
        more = "..." if len(out["blocks"]) > 8 else ""
        if finding["repaired"]:
            self._event("scrub-repaired", f"volume {volume}: {where} repaired from "
                        f"{src.name}: {len(out['blocks'])} block(s) rewritten at "
                        f"{blocks}{more}", volume, level="warning")
        else:
            finding["why"] = f"{where}: still differs after its repair"
            self._event("scrub-repair-failed", f"volume {volume}: {finding['why']}", volume,
                        level="warning")
        return finding

    async def _record(self, volume: str, members: list[_Member], la: dict[str, Any]) -> None:
        """Have every member record the layer's checksum (computed once, then cached), so
        the next scrub can decide between two replicas; warn when they disagree."""
        sums = await asyncio.gather(*(self._call(m, "GET", f"/v1/layers/{la['file']}/checksum")
                                      for m in members), return_exceptions=True)
        seen = {s["checksum"] for s in sums if isinstance(s, dict)}
        if len(seen) > 1:
            self._event("scrub-checksums-differ", f"volume {volume}: layer {la['file']}'s "
                        "recorded checksums differ between replicas after the scrub; scrub "
                        "it again", volume, level="warning")


def _common_layers(trees: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The complete snapshot layers every replica holds (same file, same size), oldest
    first: what a scrub compares."""
    def usable(la: dict[str, Any]) -> bool:
        return not la["head"] and not la.get("incomplete") and not la.get("backing")

    first = [la for la in trees[0] if usable(la)]
    others = [{la["file"]: la for la in t if usable(la)} for t in trees[1:]]
    out = [la for la in first
           if all(o.get(la["file"], {}).get("size") == la["size"] for o in others)]
    return sorted(out, key=lambda la: (la["created"], la["file"]))


def _majority(column: list[str]) -> tuple[int | None, str]:
    """The index of a copy more than half the replicas agree with, and how it was decided."""
    value, count = Counter(column).most_common(1)[0]
    if count * 2 > len(column):
        return column.index(value), f"majority: {count} of {len(column)} replicas agree"
    return None, "no majority"


def _by_checksum(column: list[str], rehashed: list[dict[str, Any]]) -> tuple[int | None, str]:
    """The index of a copy whose layer still hashes to its recorded checksum, when the
    intact copies agree on this range."""
    intact = [k for k, r in enumerate(rehashed) if r.get("matches")]
    if not intact:
        known = any(r.get("recorded") for r in rehashed)
        return None, ("no replica's layer matches its recorded checksum" if known else
                      "no checksum was recorded for the layer yet (a clean scrub records it)")
    if len({column[k] for k in intact}) > 1:
        return None, "copies matching their recorded checksums differ"
    return intact[0], "checksum: the layer hashes to its recorded checksum only there"


__all__ = ["KIND", "RANGE", "Scrubber"]
