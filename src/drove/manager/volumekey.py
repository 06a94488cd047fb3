"""Each volume's NBD access key, kept in its document (see drove.replica.access)."""

from __future__ import annotations

from typing import Any

from drove.replica.access import bearer, keyed_export, new_key, valid_key

FIELD = "nbd_key"
"""The volume document's field holding the key (never shown by the API's views)."""


def volume_key(doc: dict[str, Any]) -> str:
    """The key of volume ``doc``, made on first use (the caller saves the document)."""
    key = doc.get(FIELD)
    if not isinstance(key, str) or not valid_key(key):
        key = doc[FIELD] = new_key()
    return key


def keyed_base(doc: dict[str, Any], nbd_base: str) -> str:
    """A replica's NBD base URI (``nbd://H:P``) with the volume's key: ``BASE/EXPORT`` then
    opens ``EXPORT`` on it."""
    return nbd_base.rstrip("/") + "/" + keyed_export(volume_key(doc), "").rstrip("/")


def control_headers(doc: dict[str, Any]) -> dict[str, str]:
    """The headers a call to a replica's or engine's control API of volume ``doc`` carries
    (its key)."""
    return bearer(volume_key(doc))
