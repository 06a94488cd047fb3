"""Encrypted volumes' data keys, wrapped by the manager's key-encryption key (KEK).

Each encrypted volume has one random AES-XTS-256 data key (drove.engine.crypt).
Its record keeps it only wrapped (AES key wrap, RFC 3394, by the KEK given to
`drove serve --kek-file F`) with two public fingerprints: ``kek_id``, which KEK
wrapped it, and ``key_id``, which data key it is (clones, backups and restores
name the key they need by it).  Unwrapping with another KEK fails the key
wrap's own integrity check, and the result is checked against ``key_id`` too:
a wrong or missing KEK is refused, never served as garbage.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from drove.engine.crypt import KEY_BYTES, check_key, key_check
from drove.manager.errors import ApiError

CIPHER = "aes-xts-plain64-4k"
"""What an encrypted volume's record names as its cipher (the engine's layer)."""

FIELD = "encryption"
"""The volume record's field: {cipher, key_id, kek_id, wrapped_key} (None: plain)."""

_PASSPHRASE_SALT = b"drove key-encryption key v1"


def kek_from_file(path: Path) -> bytes:
    """The 256-bit KEK in ``path``: 64 hex digits, 32 raw bytes, or else a passphrase (its
    first line, stretched with scrypt); ValueError when unusable."""
    raw = path.read_bytes()
    if len(raw) == 32:
        return raw
    text = raw.decode("utf-8", "replace").strip()
    try:
        key = bytes.fromhex(text)
        if len(key) == 32:
            return key
    except ValueError:
        pass
    phrase = text.splitlines()[0].strip() if text else ""
    if len(phrase) < 8:
        raise ValueError(f"{path}: not a key (64 hex digits or 32 bytes) nor a passphrase of "
                         "at least 8 characters")
    return hashlib.scrypt(phrase.encode(), salt=_PASSPHRASE_SALT, n=1 << 14, r=8, p=1,
                          dklen=32)


def kek_id(kek: bytes) -> str:
    """A public fingerprint of a KEK (to tell which one wrapped a key)."""
    return hmac.new(kek, b"drove kek id", hashlib.sha256).hexdigest()[:16]


class DataKeys:
    """Makes, wraps and unwraps volumes' data keys with this manager's KEK (or none)."""

    def __init__(self, kek: bytes | None = None) -> None:
        self._kek = kek
        self.kek_id = kek_id(kek) if kek is not None else None

    def _need_kek(self, what: str) -> bytes:
        if self._kek is None:
            raise ApiError(422, f"{what} needs the key-encryption key, and this manager has "
                                "none: start it with `drove serve --kek-file FILE`")
        return self._kek

    def new_key(self) -> dict[str, Any]:
        """The ``encryption`` field of a new encrypted volume: a fresh random data key,
        wrapped (ApiError 422 without a KEK)."""
        kek = self._need_kek("an encrypted volume")
        key = os.urandom(KEY_BYTES)
        while key[:32] == key[32:]:  # XTS refuses equal halves (never happens in practice)
            key = os.urandom(KEY_BYTES)
        return {"cipher": CIPHER, "key_id": key_check(key), "kek_id": self.kek_id,
                "wrapped_key": base64.b64encode(aes_key_wrap(kek, key)).decode("ascii")}

    def unwrap(self, enc: dict[str, Any], volume: str) -> bytes:
        """The data key of ``enc`` (a record's ``encryption``); ApiError 422 without a KEK,
        409 when this KEK did not wrap it (nothing served then)."""
        kek = self._need_kek(f"volume {volume} is encrypted (key {enc.get('key_id')}): it")
        try:
            key = aes_key_unwrap(kek, base64.b64decode(enc["wrapped_key"]))
            check_key(key)
        except (InvalidUnwrap, ValueError, KeyError, TypeError) as exc:
            raise ApiError(409, f"volume {volume}: this manager's key-encryption key (id "
                                f"{self.kek_id}) does not unwrap its data key (wrapped by "
                                f"KEK id {enc.get('kek_id')}): start `drove serve` with "
                                "that --kek-file") from exc
        if key_check(key) != enc.get("key_id"):
            raise ApiError(409, f"volume {volume}: its data key does not match its key id "
                                f"{enc.get('key_id')}; the record is damaged")
        return key


def encryption(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The ``encryption`` field of volume record ``doc`` (None: not encrypted)."""
    enc = doc.get(FIELD)
    return enc if isinstance(enc, dict) else None


def public(enc: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the API shows of a volume's encryption (the wrapped key stays in the record)."""
    if enc is None:
        return None
    return {"cipher": enc.get("cipher"), "key_id": enc.get("key_id"),
            "kek_id": enc.get("kek_id")}


KEY_ID_LABEL = "drove.key-id"
"""The label of a backup of an encrypted volume naming the data key it needs."""

WRAPPED_LABEL = "drove.wrapped-key"
"""The label carrying that key wrapped (``CIPHER KEK_ID WRAPPED``): a restore needs no
record of the backed-up volume, only the KEK."""


def backup_labels(doc: dict[str, Any]) -> dict[str, str]:
    """The labels a backup of volume ``doc`` records its key with (none when plain)."""
    enc = encryption(doc)
    if enc is None:
        return {}
    return {KEY_ID_LABEL: enc["key_id"],
            WRAPPED_LABEL: f"{enc['cipher']} {enc['kek_id']} {enc['wrapped_key']}"}


def from_backup_labels(labels: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``encryption`` a volume restored from a backup with ``labels`` gets (None: plain)."""
    labels = labels or {}
    if KEY_ID_LABEL not in labels:
        return None
    try:
        cipher, kek, wrapped = str(labels[WRAPPED_LABEL]).split()
    except (KeyError, ValueError) as exc:
        raise ApiError(422, f"the backup names data key {labels[KEY_ID_LABEL]} but does not "
                            "carry it (its label drove.wrapped-key is missing or damaged)") from exc
    if cipher != CIPHER:
        raise ApiError(422, f"the backup is encrypted with {cipher}, which drove does not know")
    return {"cipher": cipher, "key_id": str(labels[KEY_ID_LABEL]), "kek_id": kek,
            "wrapped_key": wrapped}
