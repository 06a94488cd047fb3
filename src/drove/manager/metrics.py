"""Prometheus metrics, gathered at scrape time from the store, the disks and the engines."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from drove.manager.store import Store

HEALTH = ("healthy", "degraded", "faulted")


class Volumes(Protocol):
    """What metrics need of the manager's volumes (drove.manager.core.Manager)."""

    store: Store

    def view(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A stored volume as the API shows it."""

    def disks(self) -> list[dict[str, Any]]:
        """Every disk with its live state, capacity, free and scheduled space."""

    async def engine_stats(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The I/O statistics of an attached volume's engine."""


class _Snapshot:
    """A collector over figures fetched before the (synchronous) collection runs."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        """Yield the families."""
        yield from self.families


async def _engine_stats(manager: Volumes, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The engine's statistics, or None when it does not answer (its figures are left out)."""
    try:
        return await manager.engine_stats(doc)
    except Exception:
        return None


async def render(manager: Volumes) -> tuple[bytes, str]:
    """The metrics text and its content type."""
    docs = manager.store.list("volumes")
    attached = [d for d in docs if d["state"] == "attached"]
    stats = await asyncio.gather(*(_engine_stats(manager, d) for d in attached))
    by_volume = {d["name"]: s for d, s in zip(attached, stats, strict=True) if s}

    size = GaugeMetricFamily("drove_volume_size_bytes", "Volume size", labels=["volume"])
    health = GaugeMetricFamily("drove_volume_health", "1 for the volume's current health",
                               labels=["volume", "health"])
    attached_g = GaugeMetricFamily("drove_volume_attached", "1 if attached", labels=["volume"])
    reps = GaugeMetricFamily("drove_volume_replicas", "Replicas by mode",
                             labels=["volume", "mode"])
    wanted = GaugeMetricFamily("drove_volume_replicas_wanted", "Replica count asked for",
                               labels=["volume"])
    ops = CounterMetricFamily("drove_volume_ops", "NBD requests served",
                              labels=["volume", "op"])
    errors = CounterMetricFamily("drove_volume_errors", "NBD requests failed",
                                 labels=["volume", "op"])
    nbytes = CounterMetricFamily("drove_volume_bytes", "Bytes read or written",
                                 labels=["volume", "op"])
    iops = GaugeMetricFamily("drove_volume_iops", "Requests per second over 10 s",
                             labels=["volume", "op"])
    bps = GaugeMetricFamily("drove_volume_throughput_bytes_per_second",
                            "Bytes per second over 10 s", labels=["volume", "op"])
    lat = HistogramMetricFamily("drove_volume_latency_seconds", "Request latency",
                                labels=["volume", "op"])
    for d in docs:
        v = manager.view(d)
        name = v["name"]
        size.add_metric([name], v["size"])
        wanted.add_metric([name], v["replica_count"])
        attached_g.add_metric([name], 1 if v["state"] == "attached" else 0)
        for h in HEALTH:
            health.add_metric([name, h], 1 if v["health"] == h else 0)
        counts: dict[str, int] = {}
        for r in v["replicas"]:
            counts[r["mode"]] = counts.get(r["mode"], 0) + 1
        for mode, n in counts.items():
            reps.add_metric([name, mode], n)
        s = by_volume.get(name)
        if not s:
            continue
        for op, o in s["ops"].items():
            ops.add_metric([name, op], o["count"])
            errors.add_metric([name, op], o["errors"])
            nbytes.add_metric([name, op], o["bytes"])
            buckets, acc = [], 0
            for bound_us, n in sorted(((int(k), n) for k, n in o["histogram_us"].items())):
                acc += n
                buckets.append((repr(bound_us / 1e6), acc))
            buckets.append(("+Inf", o["count"]))
            mean = (o["mean_us"] or 0) * o["count"] / 1e6
            lat.add_metric([name, op], buckets, mean)
        for op, r in s["rates_10s"].items():
            iops.add_metric([name, op], r["iops"])
            bps.add_metric([name, op], r["bytes_per_second"])

    disk_cap = GaugeMetricFamily("drove_disk_capacity_bytes", "Disk capacity", labels=["disk"])
    disk_free = GaugeMetricFamily("drove_disk_available_bytes", "Disk free space",
                                  labels=["disk"])
    disk_sched = GaugeMetricFamily("drove_disk_scheduled_bytes",
                                   "Sizes of the replicas placed on the disk", labels=["disk"])
    disk_ready = GaugeMetricFamily("drove_disk_ready", "1 if the disk is usable", labels=["disk"])
    for disk in manager.disks():
        disk_cap.add_metric([disk["name"]], disk["capacity"])
        disk_free.add_metric([disk["name"]], disk["available"])
        disk_sched.add_metric([disk["name"]], disk["scheduled"])
        disk_ready.add_metric([disk["name"]], 1 if disk["state"] == "ready" else 0)

    registry = CollectorRegistry()
    registry.register(_Snapshot([size, health, attached_g, reps, wanted, ops, errors, nbytes,
                                 iops, bps, lat, disk_cap, disk_free, disk_sched, disk_ready]))
    return generate_latest(registry), CONTENT_TYPE_LATEST
