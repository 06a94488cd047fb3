"""Hashing what users authenticate with: random API tokens, and passwords.

A token is 32 random bytes, so one SHA-256 suffices to store it (nothing to guess
from its hash); a password is chosen by a person, so it is stored with scrypt, a
slow, memory-hard KDF, and a salt of its own. Neither is ever stored in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from typing import Any

TOKEN_BYTES = 32
"""Random bytes in a new API token."""

SCRYPT = {"n": 2**14, "r": 8, "p": 1}
"""scrypt's cost (16 MiB and some 50 ms per hash): stored with each hash, so it may grow."""

MIN_PASSWORD = 8
"""Characters a password has at least."""
MAX_PASSWORD = 1024
"""Characters a password has at most (scrypt reads all of them)."""

# Each scrypt holds 16 MiB and a CPU for tens of ms: a burst of logins waits here
# rather than taking the manager's memory and cores.
_KDF_SLOTS = threading.BoundedSemaphore(2)


def new_token() -> str:
    """A new random API token (URL-safe text)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    """The stored form of a token (hex SHA-256): its key in the store."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_password_text(password: str) -> str | None:
    """Why ``password`` cannot be used (None: it can)."""
    if len(password) < MIN_PASSWORD:
        return f"a password needs at least {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"a password has at most {MAX_PASSWORD} characters"
    return None


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    with _KDF_SLOTS:
        return hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r,
                              p=p, maxmem=256 * 1024 * 1024, dklen=32)


def hash_password(password: str) -> dict[str, Any]:
    """The stored form of a password: scrypt's parameters, salt and hash."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, **SCRYPT)
    return {"kdf": "scrypt", **SCRYPT, "salt": salt.hex(), "hash": digest.hex()}


def verify_password(password: str, stored: dict[str, Any] | None) -> bool:
    """Whether ``password`` matches ``stored`` (None: no password set, which never matches)."""
    if not stored or stored.get("kdf") != "scrypt":
        # Spend the same time as a real check: the answer's delay tells no one which
        # users exist or have a password.
        _scrypt(password, b"\0" * 16, **SCRYPT)
        return False
    try:
        digest = _scrypt(password, bytes.fromhex(stored["salt"]), int(stored["n"]),
                         int(stored["r"]), int(stored["p"]))
    except (KeyError, ValueError, TypeError):
        return False
    return hmac.compare_digest(digest.hex(), str(stored.get("hash", "")))
