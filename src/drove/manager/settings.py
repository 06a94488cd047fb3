"""The manager's settings: their defaults, the values each may take, and changes to them."""

from __future__ import annotations

from typing import Any

from drove.manager import locality
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.store import Store

DEFAULT_SETTINGS: dict[str, Any] = {
    "over_provisioning_percent": 100,
    "default_replicas": 3,
    "replica_timeout": 8.0,
    "heal_interval": 1.0,
    "failed_replica_retry_seconds": 5.0,
    # A replica on a node that is down is rebuilt elsewhere only after this many seconds;
    # a node back sooner gets its replicas rebuilt in place by delta (a reboot must not
    # cost full rebuilds: Longhorn #1940).
    "replica_replenish_wait": 300.0,
    "default_data_locality": locality.DEFAULT_LOCALITY,
    # Where an engine's NBD export listens: loopback (and its unix socket) for clients on
    # its own host, or also the node's address, open to every host that reaches it (the
    # export takes no key: NBD clients such as the kernel's cannot send one).
    "engine_nbd_listen": "loopback",
    # Bytes per second a rebuild (or a backup) may read, per volume; 0: no limit. Longhorn's
    # rebuild QoS: a rebuild must not starve the volume's own I/O.
    "rebuild_bandwidth_limit": 0,
    # An engine running an older drove than its node's agent is upgraded live
    # (drove.manager.upgrade) when the agent or the manager starts anew.
    "engine_auto_upgrade": True,
}
SETTING_CHOICES: dict[str, tuple[str, ...]] = {
    "default_data_locality": locality.LOCALITIES,
    "engine_nbd_listen": ("loopback", "node"),
}
SETTING_LIMITS: dict[str, tuple[float, float]] = {
    "over_provisioning_percent": (10, 10000),
    "default_replicas": (1, 10),
    "replica_timeout": (0.5, 600),
    "heal_interval": (0.1, 60),
    "failed_replica_retry_seconds": (0.5, 3600),
    "replica_replenish_wait": (0.0, 86400),
    "rebuild_bandwidth_limit": (0, 1 << 40),
}


class Settings:
    """The settings kept in the store; one not stored has its default."""

    def __init__(self, store: Store, event: EventFn) -> None:
        self._store = store
        self._event = event

    def values(self) -> dict[str, Any]:
        """Every setting with its value."""
        stored = self._store.get("settings", "global") or {}
        return {k: stored.get(k, v) for k, v in DEFAULT_SETTINGS.items()}

    def get(self, key: str) -> Any:
        """The value of setting ``key`` now."""
        return self.values()[key]

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change settings (ApiError 422 for unknown names or values out of range)."""
        current = self.values()
        if not changes:
            return current
        for key, value in changes.items():
            if key not in DEFAULT_SETTINGS:
                raise ApiError(422, f"unknown setting {key!r}; settings are: "
                                    + ", ".join(DEFAULT_SETTINGS))
            if isinstance(DEFAULT_SETTINGS[key], bool):
                if not isinstance(value, bool):
                    raise ApiError(422, f"setting {key} must be true or false, not {value!r}")
                current[key] = value
                continue
            if key in SETTING_CHOICES:
                if value not in SETTING_CHOICES[key]:
                    raise ApiError(422, f"setting {key} must be one of "
                                        f"{', '.join(SETTING_CHOICES[key])}, not {value!r}")
                current[key] = value
                continue
            lo, hi = SETTING_LIMITS[key]
            kind = type(DEFAULT_SETTINGS[key])
            try:
                num = kind(value)
            except (TypeError, ValueError) as exc:
                raise ApiError(422, f"setting {key} must be a number, not {value!r}") from exc
            if isinstance(value, bool) or not lo <= num <= hi:
                raise ApiError(422, f"setting {key} must be between {lo} and {hi}")
            current[key] = num
        self._store.put("settings", "global", current)
        self._event("settings-changed", f"settings changed: {changes}")
        return current
