"""Exceptions of the NBD package, shared by the server and a future client."""

from __future__ import annotations

import os

from drove.nbd import proto


class NbdError(Exception):
    """Base class of every NBD error."""


class ProtocolError(NbdError):
    """The peer sent something the protocol does not allow (bad magic, bad length, ...)."""


class ConnectionClosed(NbdError):
    """The peer closed the connection (possibly in the middle of a message)."""


class HandshakeError(NbdError):
    """The handshake could not be completed (no usable export, TLS refused, ...)."""


class ExportRefused(HandshakeError):
    """An export exists but this client may not open it now (e.g. a fenced, stale epoch).

    Raised by an export provider's ``open_export``; the server answers ``reply``
    (``NBD_REP_ERR_POLICY`` unless told otherwise) with the message, and with
    ``disconnect`` ends the connection once it refused ``NBD_OPT_GO``.
    """

    def __init__(self, message: str, *, reply: int = proto.NBD_REP_ERR_POLICY,
                 disconnect: bool = False) -> None:
        super().__init__(message)
        self.reply = reply
        self.disconnect = disconnect


class TLSError(HandshakeError):
    """TLS negotiation or the TLS handshake failed."""


class OptionError(HandshakeError):
    """The server answered an option with an error reply (``NBD_REP_ERR_*``)."""

    def __init__(self, option: int, reply: int, message: str = "") -> None:
        """Record the ``option`` refused with ``reply`` and the server's ``message``."""
        self.option = option
        self.reply = reply
        self.message = message
        name = proto.OPTION_NAMES.get(option, str(option))
        super().__init__(f"option {name} failed with reply {reply:#x}: {message}")


class RequestError(NbdError, OSError):
    """A transmission request failed with an NBD error value; ``errno`` is the local errno."""

    def __init__(self, nbd_error: int, message: str = "") -> None:
        """Build from the NBD error value received (``NBD_E*``) and an optional message."""
        self.nbd_error = nbd_error
        err = proto.errno_of(nbd_error)
        OSError.__init__(self, err, message or os.strerror(err))
