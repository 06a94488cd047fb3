"""NBD protocol constants and wire formats, named exactly as in the NBD spec.

Reference: NetworkBlockDevice/nbd, ``doc/proto.md``.  Every integer on the
wire is big-endian ("network byte order").  The ``struct.Struct`` objects
below are precompiled once; each comment shows the byte layout so the hot
path never has to build a format string.
"""

from __future__ import annotations

import errno
import struct

from drove.nbd.export import NBD_STATE_HOLE as NBD_STATE_HOLE  # re-exported
from drove.nbd.export import NBD_STATE_ZERO as NBD_STATE_ZERO  # re-exported
from drove.nbd.export import Capabilities

# --- Magic numbers --------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # ASCII "NBDMAGIC" (INIT_PASSWD)
IHAVEOPT = 0x49484156454F5054  # ASCII "IHAVEOPT" (newstyle magic, also opens options)
CLISERV_MAGIC = 0x00420281861253  # oldstyle only; never sent by drove
NBD_OPTS_REPLY_MAGIC = 0x3E889045565A9  # option reply magic
NBD_REP_MAGIC = NBD_OPTS_REPLY_MAGIC  # alias used by some implementations
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_REPLY_MAGIC = NBD_SIMPLE_REPLY_MAGIC  # historic name
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
# Extended headers (newer spec revisions).  Known so that they can be
# recognised in logs and by a future client; this server does not
# negotiate NBD_OPT_EXTENDED_HEADERS and answers it with NBD_REP_ERR_UNSUP.
NBD_EXTENDED_REQUEST_MAGIC = 0x21E41C71
NBD_EXTENDED_REPLY_MAGIC = 0x6E8A278C

# --- Handshake flags (server, 16 bits) -----------------------------------

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1

# --- Client flags (32 bits) ----------------------------------------------

NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# --- Transmission flags (16 bits) ----------------------------------------

NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11
NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12  # extended headers only; never set here

# --- Option types ---------------------------------------------------------

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4  # withdrawn
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11  # not negotiated by this server

# drove's private extension between an engine and a replica on the same host (see
# drove.nbd.arena): option data is the path of the client's memfd under /proc.
# Servers that do not know it answer NBD_REP_ERR_UNSUP, and nothing else changes.
NBD_OPT_DROVE_ARENA = 0x44525641  # "DRVA"

# --- Option reply types ---------------------------------------------------

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10  # extended headers only

# --- NBD_REP_INFO information types --------------------------------------

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --- Commands -------------------------------------------------------------

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8  # experimental extension; answered with NBD_EINVAL
# drove's private WRITE whose data is in the shared arena: the request's length is the
# data's, and its 8-byte payload the u64 arena offset.  Only sent after
# NBD_OPT_DROVE_ARENA was acknowledged.
NBD_CMD_DROVE_WRITE_ARENA = 0x4457
# ... and its READ: the server reads into the arena at the u64 offset of the 8-byte
# payload and answers with a bare simple reply.
NBD_CMD_DROVE_READ_ARENA = 0x4452

# --- Command flags --------------------------------------------------------

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4
NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5  # extended headers only

# --- Structured reply flags and types ------------------------------------

NBD_REPLY_FLAG_DONE = 1 << 0

NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6  # extended headers only
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# --- Error values ---------------------------------------------------------

NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# --- Metadata contexts ----------------------------------------------------

BASE_ALLOCATION = "base:allocation"  # NBD_STATE_HOLE / NBD_STATE_ZERO are its flags

# --- Limits ---------------------------------------------------------------

NBD_MAX_STRING = 4096  # the spec's hard limit for names and messages
# Lengths below 2**25 must never be treated as a denial of service.
NBD_DOS_THRESHOLD = 32 * 1024 * 1024
# Defaults the spec assumes when no block sizes were advertised.
NBD_DEFAULT_MIN_BLOCK = 1
NBD_DEFAULT_PREFERRED_BLOCK = 4096
NBD_MAX_BLOCK_LIMIT = 0xFFFFFFFF

# --- Wire formats ---------------------------------------------------------

NEWSTYLE_GREETING = struct.Struct(">QQH")
"""Server greeting, 18 bytes: u64 NBDMAGIC, u64 IHAVEOPT, u16 handshake flags."""

CLIENT_FLAGS = struct.Struct(">I")
"""Client flags, 4 bytes: u32 client flags."""

OPTION_HEADER = struct.Struct(">QII")
"""Option request header, 16 bytes: u64 IHAVEOPT, u32 option, u32 data length."""

OPTION_REPLY = struct.Struct(">QIII")
"""Option reply header, 20 bytes: u64 reply magic, u32 option, u32 reply type, u32 length."""

EXPORT_NAME_REPLY = struct.Struct(">QH")
"""NBD_OPT_EXPORT_NAME reply, 10 bytes: u64 size, u16 transmission flags (+124 zeroes)."""

EXPORT_NAME_PADDING = bytes(124)

INFO_EXPORT = struct.Struct(">HQH")
"""NBD_INFO_EXPORT payload, 12 bytes: u16 type, u64 size, u16 transmission flags."""

INFO_BLOCK_SIZE = struct.Struct(">HIII")
"""NBD_INFO_BLOCK_SIZE payload, 14 bytes: u16 type, u32 minimum, u32 preferred, u32 maximum."""

INFO_TYPE = struct.Struct(">H")
"""NBD_INFO_* header, 2 bytes: u16 information type (name/description follow)."""

U16 = struct.Struct(">H")
"""A big-endian u16, 2 bytes."""

U32 = struct.Struct(">I")
"""A big-endian u32, 4 bytes (lengths, counts, metadata context ids)."""

REQUEST = struct.Struct(">IHHQQI")
"""Request, 28 bytes: u32 magic, u16 command flags, u16 type, u64 handle, u64 offset,
u32 length (then *length* payload bytes for NBD_CMD_WRITE)."""

EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
"""Extended request, 32 bytes: u32 magic, u16 flags, u16 type, u64 handle, u64 offset,
u64 length.  Not negotiated by this server; for reference and a future client."""

SIMPLE_REPLY = struct.Struct(">IIQ")
"""Simple reply, 16 bytes: u32 magic, u32 error, u64 handle (then read data on success)."""

STRUCTURED_REPLY = struct.Struct(">IHHQI")
"""Structured reply chunk header, 20 bytes: u32 magic, u16 flags, u16 type, u64 handle,
u32 payload length."""

OFFSET_DATA_CHUNK = struct.Struct(">IHHQIQ")
"""NBD_REPLY_TYPE_OFFSET_DATA header plus offset, 28 bytes: u32 magic, u16 flags,
u16 type, u64 handle, u32 length (= 8 + data length), u64 offset; the data follows."""

OFFSET_HOLE = struct.Struct(">QI")
"""NBD_REPLY_TYPE_OFFSET_HOLE payload, 12 bytes: u64 offset, u32 hole size."""

ERROR_CHUNK = struct.Struct(">IHHQIIH")
"""NBD_REPLY_TYPE_ERROR chunk without message, 26 bytes: u32 magic, u16 flags, u16 type,
u64 handle, u32 length (= 6 + message length), u32 error, u16 message length."""

ERROR_PAYLOAD = struct.Struct(">IH")
"""Error chunk payload prefix, 6 bytes: u32 error, u16 message length (message follows;
NBD_REPLY_TYPE_ERROR_OFFSET then appends a u64 offset)."""

BLOCK_STATUS_CHUNK = struct.Struct(">IHHQII")
"""NBD_REPLY_TYPE_BLOCK_STATUS header plus context id, 24 bytes: u32 magic, u16 flags,
u16 type, u64 handle, u32 length (= 4 + 8 * descriptors), u32 metadata context id."""

BLOCK_DESCRIPTOR = struct.Struct(">II")
"""Block status descriptor, 8 bytes: u32 extent length, u32 status flags."""

# --- Which command flags each command accepts ------------------------------

# The flags a command may carry at all (before negotiation narrows them);
# anything else is NBD_EINVAL.  FUA is valid on every command once
# NBD_FLAG_SEND_FUA was advertised, so it is added per connection.
COMMAND_FLAGS: dict[int, int] = {
    NBD_CMD_READ: NBD_CMD_FLAG_DF,
    NBD_CMD_WRITE: 0,
    NBD_CMD_DISC: 0,
    NBD_CMD_FLUSH: 0,
    NBD_CMD_TRIM: 0,
    NBD_CMD_CACHE: 0,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_BLOCK_STATUS: NBD_CMD_FLAG_REQ_ONE,
}

COMMAND_NAMES: dict[int, str] = {
    NBD_CMD_READ: "READ",
    NBD_CMD_WRITE: "WRITE",
    NBD_CMD_DISC: "DISC",
    NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM",
    NBD_CMD_CACHE: "CACHE",
    NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

OPTION_NAMES: dict[int, str] = {
    NBD_OPT_EXPORT_NAME: "EXPORT_NAME",
    NBD_OPT_ABORT: "ABORT",
    NBD_OPT_LIST: "LIST",
    NBD_OPT_PEEK_EXPORT: "PEEK_EXPORT",
    NBD_OPT_STARTTLS: "STARTTLS",
    NBD_OPT_INFO: "INFO",
    NBD_OPT_GO: "GO",
    NBD_OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    NBD_OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    NBD_OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}


def transmission_flags(caps: Capabilities, structured: bool) -> int:
    """The transmission flags a server advertises for an export with ``caps``.

    Write-side features (FUA, TRIM, WRITE_ZEROES, FAST_ZERO) are hidden on a
    read-only export, as nbdkit does, because a client must never use them
    there.  NBD_FLAG_SEND_DF requires structured replies (spec: MUST be clear
    otherwise), and NBD_FLAG_SEND_FAST_ZERO requires WRITE_ZEROES.
    """
    flags = NBD_FLAG_HAS_FLAGS
    if caps.readonly:
        flags |= NBD_FLAG_READ_ONLY
    else:
        if caps.fua:
            flags |= NBD_FLAG_SEND_FUA
        if caps.trim:
            flags |= NBD_FLAG_SEND_TRIM
        if caps.zero:
            flags |= NBD_FLAG_SEND_WRITE_ZEROES
            if caps.fast_zero:
                flags |= NBD_FLAG_SEND_FAST_ZERO
    if caps.flush:
        flags |= NBD_FLAG_SEND_FLUSH
    if structured:
        flags |= NBD_FLAG_SEND_DF
    if caps.multi_conn:
        flags |= NBD_FLAG_CAN_MULTI_CONN
    if caps.cache:
        flags |= NBD_FLAG_SEND_CACHE
    return flags


def allowed_command_flags(cmd: int, tflags: int) -> int:
    """Command flags valid for ``cmd`` given the advertised transmission flags ``tflags``."""
    allowed = COMMAND_FLAGS.get(cmd, 0)
    if cmd == NBD_CMD_READ and not tflags & NBD_FLAG_SEND_DF:
        allowed &= ~NBD_CMD_FLAG_DF
    if cmd == NBD_CMD_WRITE_ZEROES and not tflags & NBD_FLAG_SEND_FAST_ZERO:
        allowed &= ~NBD_CMD_FLAG_FAST_ZERO
    if tflags & NBD_FLAG_SEND_FUA:
        allowed |= NBD_CMD_FLAG_FUA
    return allowed


# errno -> NBD error.  The spec restricts the wire to a handful of values;
# EDQUOT and EFBIG SHOULD become ENOSPC, EROFS is a permission problem.
_ERRNO_TO_NBD: dict[int, int] = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

_NBD_TO_ERRNO: dict[int, int] = {
    NBD_EPERM: errno.EPERM,
    NBD_EIO: errno.EIO,
    NBD_ENOMEM: errno.ENOMEM,
    NBD_EINVAL: errno.EINVAL,
    NBD_ENOSPC: errno.ENOSPC,
    NBD_EOVERFLOW: errno.EOVERFLOW,
    NBD_ENOTSUP: errno.ENOTSUP,
    NBD_ESHUTDOWN: errno.ESHUTDOWN,
}


def nbd_error(err: int | None, cmd_flags: int = 0) -> int:
    """Map an errno to the NBD error value to send.

    Unknown errnos become NBD_EIO: for a storage server an unexplained
    failure (a timed-out replica, a reset connection) is an I/O error.
    The spec says a server SHOULD NOT send NBD_ENOTSUP except for a
    FAST_ZERO request and SHOULD NOT send NBD_EOVERFLOW except for a DF
    read, so otherwise those become NBD_EINVAL (as nbdkit does).
    """
    if not err:
        return NBD_EIO
    value = _ERRNO_TO_NBD.get(err, NBD_EIO)
    if value == NBD_ENOTSUP and not cmd_flags & NBD_CMD_FLAG_FAST_ZERO:
        return NBD_EINVAL
    if value == NBD_EOVERFLOW and not cmd_flags & NBD_CMD_FLAG_DF:
        return NBD_EINVAL
    return value


def errno_of(nbd_err: int) -> int:
    """Map an NBD error value received from a peer to the local errno (unknown: EINVAL)."""
    # The spec: a client SHOULD treat an unexpected error value as NBD_EINVAL.
    return _NBD_TO_ERRNO.get(nbd_err, errno.EINVAL)
