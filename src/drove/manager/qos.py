"""Volumes' QoS limits from the manager's side: checked, stored in the record, sent to engines.

A volume record holds ``qos`` (the limits of :class:`drove.engine.qos.QosLimits`,
bandwidths in bytes per second, 0: no limit).  Every engine start gets them
(with the ``rebuild_bandwidth_limit`` setting, the rebuild QoS) over the
engine's control API, and a change is sent to a running engine at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from drove.engine.qos import QosLimits
from drove.manager.engines import Engines
from drove.manager.errors import ApiError
from drove.units import parse_size

log = logging.getLogger("drove.manager")

BANDWIDTHS = ("bandwidth", "read_bandwidth", "write_bandwidth")


def _bytes(key: str, value: Any) -> Any:
    """A bandwidth given as a size string ("100M", per second) in bytes; others as given."""
    if key in BANDWIDTHS and isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ApiError(422, f"qos {key}: {exc}") from exc
    return value


def check_qos(current: dict[str, Any] | None, changes: dict[str, Any] | None) -> dict[str, Any]:
    """The limits ``current`` with ``changes`` applied, as stored (ApiError 422 when bad)."""
    try:
        base = QosLimits.from_json(current)
        if not changes:
            return base.to_json()
        if not isinstance(changes, dict):
            raise ValueError(f"qos must be an object of limits, not {changes!r}")
        return base.merged({k: _bytes(k, v) for k, v in changes.items()}).to_json()
    except (TypeError, ValueError) as exc:
        raise ApiError(422, str(exc)) from exc


async def push(engines: Engines, doc: dict[str, Any], rebuild_bandwidth: int) -> None:
    """Send the volume's limits and the rebuild limit to its running engine."""
    await engines.call(doc, "PUT", "/v1/qos", timeout=10, json={
        "limits": QosLimits.from_json(doc.get("qos")).to_json(), "replace": True,
        "rebuild_bandwidth": int(rebuild_bandwidth)})


async def push_or_warn(engines: Engines, doc: dict[str, Any], rebuild_bandwidth: int,
                       event: Callable[..., Any], engine: str = "its engine") -> None:
    """:func:`push` to a volume's newly started engine; if it refuses, an event says it serves
    without the limits (an attach or upgrade is not undone for them)."""
    try:
        await push(engines, doc, rebuild_bandwidth)
    except ApiError as exc:
        event("volume-qos-failed", f"volume {doc['name']}: {engine} did not take the QoS "
              f"limits: {exc}; it serves without them", doc["name"], level="warning")
