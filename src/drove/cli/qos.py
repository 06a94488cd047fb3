"""The QoS options of `drove volume create` and `drove volume update`.

Seven options, after QEMU's block throttling: an IOPS and a bandwidth limit for
the volume as a whole (what most users want: "this volume gets 500 IOPS and
100 MiB/s"), the same two for reads and for writes apart (a database's log
writes beside its reads), and one ``--burst`` in seconds for all buckets rather
than a burst size per limit (one knob that means the same for IOPS and bytes).
0 removes a limit.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from drove.units import format_size, parse_size


def _bandwidth(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{exc}; a bandwidth is bytes per second, e.g. 100M "
                                 "(0: no limit)") from exc


def _iops(help: str) -> Any:
    return typer.Option(min=0, show_default=False, help=help + " (0: no limit)")


def _bw(help: str) -> Any:
    return typer.Option(parser=_bandwidth, show_default=False,
                        help=help + ", bytes per second, e.g. 100M (0: no limit)")


IopsLimitOpt = Annotated[int | None, _iops("I/O operations per second, reads and writes")]
BandwidthLimitOpt = Annotated[int | None, _bw("bandwidth of reads and writes")]
ReadIopsLimitOpt = Annotated[int | None, _iops("read operations per second")]
WriteIopsLimitOpt = Annotated[int | None, _iops("write operations per second (zero and "
                                                "trim count as writes of no bytes)")]
ReadBandwidthLimitOpt = Annotated[int | None, _bw("read bandwidth")]
WriteBandwidthLimitOpt = Annotated[int | None, _bw("write bandwidth")]
BurstOpt = Annotated[float | None, typer.Option(
    min=0, max=60, show_default=False,
    help="seconds an idle volume may run above its limits (each bucket holds this many "
         "seconds at its rate; default 1)")]


def qos_body(iops_limit: int | None, bandwidth_limit: int | None,
             read_iops_limit: int | None, write_iops_limit: int | None,
             read_bandwidth_limit: int | None, write_bandwidth_limit: int | None,
             burst: float | None) -> dict[str, Any]:
    """The API's ``qos`` object of the options given (empty: none given)."""
    given = {"iops": iops_limit, "bandwidth": bandwidth_limit, "read_iops": read_iops_limit,
             "write_iops": write_iops_limit, "read_bandwidth": read_bandwidth_limit,
             "write_bandwidth": write_bandwidth_limit, "burst": burst}
    return {k: v for k, v in given.items() if v is not None}


def qos_text(qos: dict[str, Any] | None) -> str:
    """The limits set, for a person ("" when none)."""
    if not qos:
        return ""
    parts = []
    for key in ("iops", "read_iops", "write_iops"):
        if qos.get(key):
            parts.append(f"{key.replace('_', ' ')} {qos[key]}/s")
    for key in ("bandwidth", "read_bandwidth", "write_bandwidth"):
        if qos.get(key):
            parts.append(f"{key.replace('_', ' ')} {format_size(qos[key])}/s")
    if parts and qos.get("burst") not in (None, 1.0):
        parts.append(f"burst {qos['burst']:g} s")
    return ", ".join(parts)
