"""The one place an engine's layer stack is built from the volume's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from drove.engine.qos import QosLayer, QosLimits
from drove.engine.stats import StatsLayer
from drove.nbd.export import Export


@dataclass
class LayerSettings:
    """What a volume's stack holds: the settings of each layer."""

    qos: QosLimits = field(default_factory=QosLimits)


@dataclass
class Stack:
    """A built stack: its top (what the NBD server serves) and the layers one may talk to."""

    top: Export
    stats: StatsLayer
    qos: QosLayer


def build_stack(settings: LayerSettings, bottom: Export) -> Stack:
    """The volume's layers over ``bottom`` (the mirror): stats -> qos -> bottom.

    The QoS layer is always there (unlimited, it only tests a flag per request),
    so its limits can be set live; stats sits on top so its latencies are the
    clients' (a throttled request's wait included).
    """
    qos = QosLayer(bottom, settings.qos)
    stats = StatsLayer(qos)
    return Stack(top=stats, stats=stats, qos=qos)
