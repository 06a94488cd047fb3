"""A StorageClass's parameters and a VolumeAttributesClass's mutable parameters, read into the
manager API's fields (INVALID_ARGUMENT naming what is unknown or bad).

The QoS keys map to the ``qos`` object `drove volume create` and `drove volume update`
send (drove.cli.qos); ``encrypted`` to the create body's ``encrypted``. QoS limits are
the mutable parameters (ControllerModifyVolume changes them live); encryption is fixed
when the volume is made.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from drove.csi import ids
from drove.csi.errors import invalid
from drove.engine.qos import QosLimits
from drove.units import parse_size

PLACEMENT = ("replicas", "pool", "dataLocality", "fsType")
"""Parameters fixed at creation that place and format the volume."""

IOPS = {"iopsLimit": "iops", "readIopsLimit": "read_iops", "writeIopsLimit": "write_iops"}
BANDWIDTHS = {"bandwidthLimit": "bandwidth", "readBandwidthLimit": "read_bandwidth",
              "writeBandwidthLimit": "write_bandwidth"}
QOS = {**IOPS, **BANDWIDTHS, "burst": "burst"}
"""The QoS parameters and the fields of the API's ``qos`` object they set."""

ENCRYPTED = "encrypted"
PARAMETERS = (*PLACEMENT, *QOS, ENCRYPTED)
"""Every parameter drove knows, in the order messages list them."""

MUTABLE = tuple(QOS)
"""The parameters ControllerModifyVolume (and CreateVolume's mutable_parameters) take."""

LOCALITIES = ("disabled", "best-effort", "strict-local")
PROVISIONER_PREFIX = "csi.storage.k8s.io/"
"""Keys of Kubernetes' external-provisioner, passed over."""


def _unknown(params: Mapping[str, str], known: tuple[str, ...], what: str) -> None:
    """INVALID_ARGUMENT naming the keys of ``params`` not in ``known``."""
    unknown = sorted(k for k in params if k not in known
                     and not k.startswith(PROVISIONER_PREFIX))
    if unknown:
        raise invalid(f"unknown {what}(s) {', '.join(unknown)}: drove knows "
                      f"{', '.join(known)}")


def _number(key: str, text: str) -> int | float:
    """One QoS parameter's value: a count, a bandwidth (bytes per second: 4096, 100M, 100Mi)
    or the burst in seconds."""
    try:
        if key in IOPS:
            value: int | float = int(text)
            if value < 0:
                raise ValueError
            return value
        if key in BANDWIDTHS:
            # Kubernetes quantities write 100Mi where drove writes 100M or 100MiB.
            return parse_size(text + "B" if text.endswith("i") else text)
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise ValueError
        return value
    except ValueError:
        want = ("a count of operations per second >= 0" if key in IOPS else
                "bytes per second, e.g. 104857600, 100M or 100Mi" if key in BANDWIDTHS else
                "seconds, e.g. 0.5")
        raise invalid(f"parameter {key}={text!r}: want {want} (0: no limit)") from None


def qos(params: Mapping[str, str]) -> dict[str, Any]:
    """The API's ``qos`` object of the QoS parameters in ``params`` (empty: none given);
    INVALID_ARGUMENT when a value is bad, alone or with the others."""
    out = {QOS[k]: _number(k, v) for k, v in params.items() if k in QOS}
    try:
        QosLimits.from_json(out)  # the bounds the manager and the engine hold them to
    except ValueError as exc:
        raise invalid(f"QoS parameters: {exc}") from None
    return out


def _encrypted(text: str) -> bool:
    """``encrypted``'s value: true or false."""
    if text.lower() not in ("true", "false"):
        raise invalid(f"parameter {ENCRYPTED}={text!r}: want true or false")
    return text.lower() == "true"


def mutable(params: Mapping[str, str]) -> dict[str, Any]:
    """The ``qos`` change of ControllerModifyVolume's (or CreateVolume's) mutable parameters;
    INVALID_ARGUMENT for a parameter that cannot change or is unknown."""
    if ENCRYPTED in params:
        raise invalid(f"parameter {ENCRYPTED} cannot change: a volume is encrypted, or not, "
                      "from its creation (make a new volume and copy the data)")
    fixed = sorted(k for k in params if k in PLACEMENT)
    if fixed:
        raise invalid(f"parameter(s) {', '.join(fixed)} cannot change through mutable "
                      f"parameters: only {', '.join(MUTABLE)} can")
    _unknown(params, MUTABLE, "mutable parameter")
    return qos(params)


def create_body(params: Mapping[str, str], mutable_params: Mapping[str, str]) -> dict[str, Any]:
    """The create body's fields (replicas, pool, data_locality, qos, encrypted) from a
    StorageClass's parameters and the mutable parameters (which take precedence)."""
    _unknown(params, PARAMETERS, "parameter")
    out: dict[str, Any] = {}
    if "replicas" in params:
        try:
            out["replicas"] = int(params["replicas"])
        except ValueError:
            out["replicas"] = 0
        if out["replicas"] < 1:
            raise invalid(f"parameter replicas={params['replicas']!r}: want a count >= 1")
    if params.get("pool"):
        out["pool"] = params["pool"]
    if "dataLocality" in params:
        if params["dataLocality"] not in LOCALITIES:
            raise invalid(f"parameter dataLocality={params['dataLocality']!r}: use one of "
                          f"{', '.join(LOCALITIES)}")
        out["data_locality"] = params["dataLocality"]
    if "fsType" in params and params["fsType"] not in ids.FILESYSTEMS:
        raise invalid(f"parameter fsType={params['fsType']!r}: use ext4 or xfs")
    mutable(mutable_params)  # INVALID_ARGUMENT for what cannot change or is unknown
    given = {k: v for k, v in params.items() if k in QOS}
    if limits := qos({**given, **mutable_params}):  # validated together: burst bounds all
        out["qos"] = limits
    if ENCRYPTED in params:
        out["encrypted"] = _encrypted(params[ENCRYPTED])
    return out


def label(params: Mapping[str, str]) -> str:
    """The parameters as the volume's label keeps them (compact JSON, sorted keys)."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"))


def from_label(text: str | None) -> dict[str, str]:
    """The parameters a volume's label holds ({} when none or not JSON: edited by hand)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
