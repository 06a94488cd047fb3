"""Parsing and printing of sizes and network addresses given by users."""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse ``10G``, ``512MiB``, ``4096`` into bytes (binary units)."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 512M, 10G, 1T)")
    return int(m.group(1)) * _SUFFIXES[m.group(2).upper()]


def format_size(n: int) -> str:
    """Render bytes in the largest binary unit that keeps the figure readable."""
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB"):
        scale = _SUFFIXES[unit[0]]
        if n >= scale:
            return f"{n / scale:.1f} {unit}".replace(".0 ", " ")
    return f"{n} B"


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``:PORT`` or ``PORT`` (``[::1]:PORT`` for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise ValueError(
            f"not an address: {text!r} (use HOST:PORT, e.g. 127.0.0.1:10809)"
        ) from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, number
