"""Who may open a replica's NBD exports: the engines (and readers) of its own volume.

Every volume has an **access key**: 32 random bytes, hex, kept in the volume's
document in the manager's store.  The agent hands it to the volume's replica
processes and to its engine in the environment (``DROVE_NBD_KEY``), never on a
command line (``ps`` shows those to every user; ``/proc/PID/environ`` only to
the owner).  A replica that has a key serves an export only to a client that
names it with the key in front::

    key=<64 hex>/head@epoch=7         the engine of epoch 7
    key=<64 hex>/layer/FILE           a rebuild pulling a layer
    key=<64 hex>/snapshot/NAME        a backup, an export handed out by the manager

Carrying the key in the export name works with every NBD client (qemu-img,
nbdinfo, nbdcopy, libnbd URIs ``nbd://HOST:PORT/key=.../snapshot/s``) and
needs no protocol extension; the epoch fence still decides which engine may
write.  A client without the key, or with a wrong one, is answered
``NBD_REP_ERR_UNKNOWN`` (the same answer whether the export exists or not, so
nothing is learnt about the replica) and disconnected at ``NBD_OPT_GO``;
listing the exports is refused.  A replica without a key (run by hand, or
started before keys existed) serves every name and ignores a key prefix.
Between hosts the key travels in clear unless the replica is served with TLS.

The replica's control API demands the same key (``Authorization: Bearer KEY``;
401 without it): its calls change the chain (revert, delete, rebuild) or tell
what a stale engine would need (the epoch).
"""

from __future__ import annotations

import os
import re
import secrets

from drove.nbd import proto
from drove.nbd.errors import ExportRefused

KEY_ENV = "DROVE_NBD_KEY"
"""The environment variable a replica or engine process reads its volume's key from."""

FROM_ENV = "from-env"
"""Default of a key argument: the process's key (:func:`process_key`)."""

_PREFIX = "key="
_KEY = re.compile(r"[0-9a-f]{64}")


class AccessDenied(ExportRefused):
    """The client did not name the volume's access key: nothing is served to it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reply=proto.NBD_REP_ERR_UNKNOWN, disconnect=True)


def new_key() -> str:
    """A fresh volume access key (64 hex digits)."""
    return secrets.token_hex(32)


def valid_key(key: str) -> bool:
    """Whether ``key`` has the form of an access key."""
    return bool(_KEY.fullmatch(key))


def process_key() -> str | None:
    """The access key this process was started with (``DROVE_NBD_KEY``), or None.

    ValueError when the variable is set but is not a key (better to refuse to
    start than to serve unprotected).
    """
    key = os.environ.get(KEY_ENV)
    if not key:
        return None
    if not valid_key(key):
        raise ValueError(f"{KEY_ENV} is not an access key (64 lower-case hex digits)")
    return key


def keyed_export(key: str | None, export: str) -> str:
    """The export name a client of the volume uses for ``export`` (unchanged without a key)."""
    return export if key is None else f"{_PREFIX}{key}/{export}"


def bearer(key: str | None) -> dict[str, str]:
    """The header a client of a keyed replica's control API sends ({} without a key)."""
    return {} if key is None else {"authorization": f"Bearer {key}"}


def split_key(name: str) -> tuple[str | None, str]:
    """(key, export) of a requested export name; key None when the name carries none."""
    if name.startswith(_PREFIX):
        key, sep, export = name[len(_PREFIX):].partition("/")
        if sep:
            return key, export
    return None, name


# As written in an export name, or percent-encoded in a URI (key%3D...%2F).
_IN_URI = re.compile(r"key(?:=|%3[dD])[^/?#%\s]*(?:/|%2[fF])")


def redact(text: str) -> str:
    """``text`` (a URI, a message) with any access key in it masked, for logs and answers."""
    return _IN_URI.sub("key=***/", text)


class Gate:
    """The replica's side: checks the key a client named against the volume's."""

    def __init__(self, key: str | None) -> None:
        if key is not None and not valid_key(key):
            raise ValueError("an access key is 64 lower-case hex digits")
        self._key = key

    @property
    def protected(self) -> bool:
        """Whether a key is demanded."""
        return self._key is not None

    def admit(self, name: str) -> str:
        """The export ``name`` asks for, once its key is right (AccessDenied otherwise)."""
        key, export = split_key(name)
        if self._key is None:
            return export
        # Constant time: a wrong guess learns nothing from the answer's timing.
        if key is None or not secrets.compare_digest(key.encode(), self._key.encode()):
            raise AccessDenied("no such export for this client: this replica serves only "
                               "clients that name its volume's access key "
                               "(key=KEY/EXPORT)")
        return export

    def admits_header(self, authorization: str | None) -> bool:
        """Whether a control API request's ``Authorization`` header carries the key (always
        without a key)."""
        if self._key is None:
            return True
        given = (authorization or "").encode()
        return secrets.compare_digest(given, bearer(self._key)["authorization"].encode())

    def check_listing(self) -> None:
        """Refuse NBD_OPT_LIST on a protected replica (it names no key)."""
        if self._key is not None:
            raise ExportRefused("listing exports is not allowed on this replica")
