"""Names, target layout and the JSON documents (manifests, volume.cfg) of the store.

::

    volumes/<volume>/volume.cfg              the volume's last backup and snapshot
    volumes/<volume>/backups/<backup>.cfg    a backup manifest
    blocks/ab/cd/<sha256>.blk                block data (``blocks.block_key``)
    locks/<uuid>.json                        lock files (``locks``)
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from typing import Any

from drove.backup.blocks import BLOCK_SIZE
from drove.backup.errors import BackupError, NotFoundError
from drove.backup.target import Target

FORMAT = "drove-backup/1"
VOLUMES = "volumes/"
BLOCKS = "blocks/"

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_HASH = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEY = re.compile(r"volumes/([^/]+)/backups/([^/]+)\.cfg")
_BLOCK_KEY = re.compile(r"blocks/[0-9a-f]{2}/[0-9a-f]{2}/([0-9a-f]{64})\.blk")


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid volume or backup name, else ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"bad {kind} name {name!r}: use 1-63 characters of a-z, 0-9, '.', "
                         "'_' and '-', starting with a letter or digit")
    return name


def new_backup_name() -> str:
    """A fresh random backup name, ``backup-<16 hex>``."""
    return f"backup-{secrets.token_hex(8)}"


def now_iso() -> str:
    """The current UTC time, ISO 8601 with milliseconds (sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def manifest_key(volume: str, name: str) -> str:
    """Where the manifest of backup ``name`` of ``volume`` lives."""
    return f"{VOLUMES}{volume}/backups/{name}.cfg"


def volume_key(volume: str) -> str:
    """Where ``volume``'s volume.cfg lives."""
    return f"{VOLUMES}{volume}/volume.cfg"


def parse_manifest_key(key: str) -> tuple[str, str] | None:
    """(volume, backup) of a manifest key, None for any other key."""
    m = _MANIFEST_KEY.fullmatch(key)
    return (m.group(1), m.group(2)) if m else None


def block_hash(key: str) -> str | None:
    """The hash of a block key, None for anything else under ``blocks/``."""
    m = _BLOCK_KEY.fullmatch(key)
    return m.group(1) if m else None


def block_length(offset: int, size: int) -> int:
    """Bytes of the block at ``offset`` in a volume of ``size`` (the last may be short)."""
    return min(BLOCK_SIZE, size - offset)


def dump(doc: dict[str, Any]) -> bytes:
    """Compact JSON (a manifest of a big volume has hundreds of thousands of entries)."""
    return json.dumps(doc, separators=(",", ":")).encode()


def load(target: Target, key: str, what: str = "manifest") -> dict[str, Any]:
    """The JSON object stored at ``key``; NotFoundError, or BackupError if unparsable."""
    raw = target.get(key)
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise BackupError(f"{what} {key} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BackupError(f"{what} {key} is not valid: not a JSON object")
    return doc


def check_manifest(doc: dict[str, Any], key: str) -> dict[int, str]:
    """The offset → hash map of manifest ``doc``, after checking that it is one of ours."""
    def bad(why: str) -> BackupError:
        return BackupError(f"manifest {key} is not valid: {why}")

    if doc.get("format") != FORMAT:
        raise bad(f"unknown format {doc.get('format')!r} (expected {FORMAT})")
    if doc.get("block_size") != BLOCK_SIZE:
        raise bad(f"block size {doc.get('block_size')!r} is not {BLOCK_SIZE}")
    size = doc.get("size")
    raw = doc.get("blocks")
    if not isinstance(size, int) or size < 0:
        raise bad(f"bad size {size!r}")
    if not isinstance(raw, dict):
        raise bad("no block map")
    blocks: dict[int, str] = {}
    for text, h in raw.items():
        try:
            offset = int(text)
        except ValueError:
            raise bad(f"offset {text!r} is not a number") from None
        if offset < 0 or offset >= size or offset % BLOCK_SIZE:
            raise bad(f"offset {offset} is not a block of a {size} byte volume")
        if not isinstance(h, str) or not _HASH.fullmatch(h):
            raise bad(f"block at offset {offset} has a bad hash {h!r}")
        blocks[offset] = h
    return blocks


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """A manifest without its block map."""
    return {k: v for k, v in doc.items() if k != "blocks"}


def find(target: Target, name: str) -> str:
    """The manifest key of backup ``name`` in any volume; NotFoundError if there is none."""
    found = [key for key in target.list(VOLUMES)
             if (parsed := parse_manifest_key(key)) and parsed[1] == name]
    if not found:
        raise NotFoundError(f"backup {name!r} does not exist in {target.url}")
    if len(found) > 1:
        raise BackupError(f"backup name {name!r} is ambiguous in {target.url}: "
                          f"{', '.join(sorted(found))}")
    return found[0]
