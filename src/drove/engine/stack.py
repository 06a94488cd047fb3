"""The one place an engine's layer stack is built from the volume's settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from drove.engine.qos import QosLayer, QosLimits
from drove.engine.stats import StatsLayer
from drove.nbd.export import Export

if TYPE_CHECKING:
    from drove.engine.crypt import CryptLayer


@dataclass
class LayerSettings:
    """What a volume's stack holds: the settings of each layer."""

    qos: QosLimits = field(default_factory=QosLimits)
    data_key: bytes | None = None  # an encrypted volume's AES-XTS key (drove.engine.crypt)


@dataclass
class Stack:
    """A built stack: its top (what the NBD server serves) and the layers one may talk to."""

    top: Export
    stats: StatsLayer
    qos: QosLayer
    crypt: CryptLayer | None = None


def build_stack(settings: LayerSettings, bottom: Export) -> Stack:
    """The volume's layers over ``bottom`` (the mirror): stats -> qos -> [crypt ->] bottom.

    The QoS layer is always there, so its limits can be set live; while it has
    none, the callback path above it is wired past it (one call less per request:
    QoS costs nothing until a limit is set); stats sits on top so its latencies are the
    clients' (a throttled request's wait included).  The encryption layer, for
    an encrypted volume, sits right above the mirror: QoS counts the clients'
    requests, and nothing below it (replicas, rebuilds, backups) sees plaintext.
    """
    crypt = None
    if settings.data_key is not None:
        # Imported only here: the cipher libraries cost an engine of a plain volume ~6 MiB.
        from drove.engine.crypt import CryptLayer

        crypt = CryptLayer(bottom, settings.data_key)
    qos = QosLayer(crypt or bottom, settings.qos)
    stats = StatsLayer(qos)

    def wire(throttling: bool) -> None:
        stats.below = qos.submit if throttling else qos.below

    qos.on_throttling = wire
    wire(not qos.limits.unlimited)
    return Stack(top=stats, stats=stats, qos=qos, crypt=crypt)
