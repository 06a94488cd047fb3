"""drove.nbd.proto: constants, wire layouts, flag computation, error mapping."""

from __future__ import annotations

import errno

import pytest

from drove.nbd import proto
from drove.nbd.errors import NbdError, OptionError, ProtocolError, RequestError
from drove.nbd.export import Capabilities
from drove.nbd.server import block_sizes


def test_magics_are_the_spec_values() -> None:
    assert proto.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert proto.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert proto.NBD_OPTS_REPLY_MAGIC == 0x3E889045565A9
    assert proto.NBD_REQUEST_MAGIC == 0x25609513
    assert proto.NBD_SIMPLE_REPLY_MAGIC == 0x67446698
    assert proto.NBD_STRUCTURED_REPLY_MAGIC == 0x668E33EF


def test_numbering_follows_the_spec() -> None:
    # Options and commands are numbered, not bit flags.
    assert [
        proto.NBD_OPT_EXPORT_NAME,
        proto.NBD_OPT_ABORT,
        proto.NBD_OPT_LIST,
        proto.NBD_OPT_STARTTLS,
        proto.NBD_OPT_INFO,
        proto.NBD_OPT_GO,
        proto.NBD_OPT_STRUCTURED_REPLY,
        proto.NBD_OPT_LIST_META_CONTEXT,
        proto.NBD_OPT_SET_META_CONTEXT,
    ] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert list(range(8)) == [
        proto.NBD_CMD_READ,
        proto.NBD_CMD_WRITE,
        proto.NBD_CMD_DISC,
        proto.NBD_CMD_FLUSH,
        proto.NBD_CMD_TRIM,
        proto.NBD_CMD_CACHE,
        proto.NBD_CMD_WRITE_ZEROES,
        proto.NBD_CMD_BLOCK_STATUS,
    ]
    assert proto.NBD_REP_ERR_UNSUP == 2**31 + 1
    assert proto.NBD_REP_ERR_TLS_REQD == 2**31 + 5
    assert proto.NBD_REP_ERR_UNKNOWN == 2**31 + 6
    assert proto.NBD_REP_ERR_TOO_BIG == 2**31 + 9
    assert proto.NBD_REPLY_TYPE_ERROR == 2**15 + 1
    assert proto.NBD_REPLY_TYPE_ERROR_OFFSET == 2**15 + 2
    assert proto.NBD_FLAG_SEND_CACHE == 1 << 10 and proto.NBD_FLAG_SEND_FAST_ZERO == 1 << 11
    assert proto.NBD_CMD_FLAG_FAST_ZERO == 1 << 4 and proto.NBD_CMD_FLAG_REQ_ONE == 1 << 3
    errors = (
        proto.NBD_EPERM,
        proto.NBD_EIO,
        proto.NBD_ENOMEM,
        proto.NBD_EINVAL,
        proto.NBD_ENOSPC,
        proto.NBD_EOVERFLOW,
        proto.NBD_ENOTSUP,
        proto.NBD_ESHUTDOWN,
    )
    assert errors == (1, 5, 12, 22, 28, 75, 95, 108)


@pytest.mark.parametrize(
    ("fmt", "size"),
    [
        (proto.NEWSTYLE_GREETING, 18),
        (proto.CLIENT_FLAGS, 4),
        (proto.OPTION_HEADER, 16),
        (proto.OPTION_REPLY, 20),
        (proto.EXPORT_NAME_REPLY, 10),
        (proto.INFO_EXPORT, 12),
        (proto.INFO_BLOCK_SIZE, 14),
        (proto.REQUEST, 28),
        (proto.EXTENDED_REQUEST, 32),
        (proto.SIMPLE_REPLY, 16),
        (proto.STRUCTURED_REPLY, 20),
        (proto.OFFSET_DATA_CHUNK, 28),
        (proto.OFFSET_HOLE, 12),
        (proto.ERROR_CHUNK, 26),
        (proto.ERROR_PAYLOAD, 6),
        (proto.BLOCK_STATUS_CHUNK, 24),
        (proto.BLOCK_DESCRIPTOR, 8),
    ],
)
def test_struct_sizes(fmt, size: int) -> None:
    assert fmt.size == size
    assert fmt.format.startswith(">")  # network byte order, no padding


def test_request_layout_is_big_endian_field_by_field() -> None:
    raw = proto.REQUEST.pack(
        proto.NBD_REQUEST_MAGIC, 0x0102, 0x0304, 0x05060708090A0B0C, 0x1112131415161718, 0x21222324
    )
    assert raw == bytes.fromhex("256095130102030405060708090a0b0c111213141516171821222324")
    assert proto.REQUEST.unpack(raw)[1:] == (
        0x0102,
        0x0304,
        0x05060708090A0B0C,
        0x1112131415161718,
        0x21222324,
    )


def test_reply_layouts() -> None:
    assert proto.SIMPLE_REPLY.pack(proto.NBD_SIMPLE_REPLY_MAGIC, 28, 7) == bytes.fromhex(
        "674466980000001c0000000000000007"
    )
    chunk = proto.OFFSET_DATA_CHUNK.pack(
        proto.NBD_STRUCTURED_REPLY_MAGIC,
        proto.NBD_REPLY_FLAG_DONE,
        proto.NBD_REPLY_TYPE_OFFSET_DATA,
        9,
        8 + 512,
        4096,
    )
    # The generic chunk header followed by the u64 offset.
    assert chunk[:20] == proto.STRUCTURED_REPLY.pack(proto.NBD_STRUCTURED_REPLY_MAGIC, 1, 1, 9, 520)
    assert chunk[20:] == (4096).to_bytes(8, "big")
    err = proto.ERROR_CHUNK.pack(
        proto.NBD_STRUCTURED_REPLY_MAGIC, 1, proto.NBD_REPLY_TYPE_ERROR, 3, 6 + 2, proto.NBD_EIO, 2
    )
    assert err[20:] == proto.ERROR_PAYLOAD.pack(proto.NBD_EIO, 2)
    status = proto.BLOCK_STATUS_CHUNK.pack(
        proto.NBD_STRUCTURED_REPLY_MAGIC, 1, proto.NBD_REPLY_TYPE_BLOCK_STATUS, 3, 4 + 8, 1
    )
    assert status[20:] == (1).to_bytes(4, "big")
    assert proto.OPTION_REPLY.pack(proto.NBD_OPTS_REPLY_MAGIC, 7, proto.NBD_REP_ACK, 0) == (
        bytes.fromhex("0003e889045565a9000000070000000100000000")
    )
    assert proto.INFO_EXPORT.pack(proto.NBD_INFO_EXPORT, 1 << 40, 0x1FD) == bytes.fromhex(
        "0000000001000000000001fd"
    )


def test_transmission_flags_full_featured() -> None:
    flags = proto.transmission_flags(Capabilities(), structured=True)
    expected = (
        proto.NBD_FLAG_HAS_FLAGS
        | proto.NBD_FLAG_SEND_FLUSH
        | proto.NBD_FLAG_SEND_FUA
        | proto.NBD_FLAG_SEND_TRIM
        | proto.NBD_FLAG_SEND_WRITE_ZEROES
        | proto.NBD_FLAG_SEND_DF
        | proto.NBD_FLAG_CAN_MULTI_CONN
        | proto.NBD_FLAG_SEND_CACHE
        | proto.NBD_FLAG_SEND_FAST_ZERO
    )
    assert flags == expected
    assert not flags & proto.NBD_FLAG_READ_ONLY


def test_transmission_flags_depend_on_negotiation_and_caps() -> None:
    # DF only with structured replies.
    assert not proto.transmission_flags(Capabilities(), structured=False) & proto.NBD_FLAG_SEND_DF
    # FAST_ZERO requires WRITE_ZEROES.
    no_zero = proto.transmission_flags(Capabilities(zero=False), structured=True)
    assert not no_zero & (proto.NBD_FLAG_SEND_WRITE_ZEROES | proto.NBD_FLAG_SEND_FAST_ZERO)
    no_fast = proto.transmission_flags(Capabilities(fast_zero=False), structured=True)
    assert no_fast & proto.NBD_FLAG_SEND_WRITE_ZEROES
    assert not no_fast & proto.NBD_FLAG_SEND_FAST_ZERO
    # Read-only hides every write-side feature, keeps flush and cache.
    ro = proto.transmission_flags(Capabilities(readonly=True), structured=True)
    assert ro & proto.NBD_FLAG_READ_ONLY
    assert not ro & (
        proto.NBD_FLAG_SEND_FUA
        | proto.NBD_FLAG_SEND_TRIM
        | proto.NBD_FLAG_SEND_WRITE_ZEROES
        | proto.NBD_FLAG_SEND_FAST_ZERO
    )
    assert ro & proto.NBD_FLAG_SEND_FLUSH and ro & proto.NBD_FLAG_SEND_CACHE
    minimal = Capabilities(
        flush=False, fua=False, trim=False, zero=False, cache=False, multi_conn=False
    )
    assert proto.transmission_flags(minimal, structured=False) == proto.NBD_FLAG_HAS_FLAGS


def test_allowed_command_flags() -> None:
    full = proto.transmission_flags(Capabilities(), structured=True)
    plain = proto.transmission_flags(Capabilities(fast_zero=False, fua=False), structured=False)
    fua = proto.NBD_CMD_FLAG_FUA
    assert proto.allowed_command_flags(proto.NBD_CMD_READ, full) == fua | proto.NBD_CMD_FLAG_DF
    assert proto.allowed_command_flags(proto.NBD_CMD_READ, plain) == 0
    assert proto.allowed_command_flags(proto.NBD_CMD_WRITE, full) == fua
    assert proto.allowed_command_flags(proto.NBD_CMD_WRITE_ZEROES, full) == (
        fua | proto.NBD_CMD_FLAG_NO_HOLE | proto.NBD_CMD_FLAG_FAST_ZERO
    )
    assert proto.allowed_command_flags(proto.NBD_CMD_WRITE_ZEROES, plain) == (
        proto.NBD_CMD_FLAG_NO_HOLE
    )
    assert proto.allowed_command_flags(proto.NBD_CMD_BLOCK_STATUS, plain) == (
        proto.NBD_CMD_FLAG_REQ_ONE
    )
    assert proto.allowed_command_flags(proto.NBD_CMD_TRIM, full) == fua
    assert proto.allowed_command_flags(99, full) == fua  # unknown commands are refused anyway


@pytest.mark.parametrize(
    ("err", "flags", "expected"),
    [
        (errno.EPERM, 0, proto.NBD_EPERM),
        (errno.EROFS, 0, proto.NBD_EPERM),
        (errno.EIO, 0, proto.NBD_EIO),
        (errno.ENOMEM, 0, proto.NBD_ENOMEM),
        (errno.EINVAL, 0, proto.NBD_EINVAL),
        (errno.ENOSPC, 0, proto.NBD_ENOSPC),
        (errno.EDQUOT, 0, proto.NBD_ENOSPC),
        (errno.EFBIG, 0, proto.NBD_ENOSPC),
        (errno.ESHUTDOWN, 0, proto.NBD_ESHUTDOWN),
        (errno.ENOTSUP, proto.NBD_CMD_FLAG_FAST_ZERO, proto.NBD_ENOTSUP),
        (errno.EOPNOTSUPP, proto.NBD_CMD_FLAG_FAST_ZERO, proto.NBD_ENOTSUP),
        (errno.ENOTSUP, 0, proto.NBD_EINVAL),
        (errno.EOVERFLOW, proto.NBD_CMD_FLAG_DF, proto.NBD_EOVERFLOW),
        (errno.EOVERFLOW, 0, proto.NBD_EINVAL),
        (errno.ETIMEDOUT, 0, proto.NBD_EIO),
        (errno.ECONNRESET, 0, proto.NBD_EIO),
        (None, 0, proto.NBD_EIO),
        (0, 0, proto.NBD_EIO),
    ],
)
def test_errno_to_nbd_error(err: int | None, flags: int, expected: int) -> None:
    assert proto.nbd_error(err, flags) == expected


def test_nbd_error_to_errno_and_request_error() -> None:
    assert proto.errno_of(proto.NBD_ENOSPC) == errno.ENOSPC
    assert proto.errno_of(proto.NBD_ESHUTDOWN) == errno.ESHUTDOWN
    assert proto.errno_of(12345) == errno.EINVAL  # the spec: unknown values mean EINVAL
    exc = RequestError(proto.NBD_EPERM, "read-only")
    assert isinstance(exc, OSError) and isinstance(exc, NbdError)
    assert exc.errno == errno.EPERM and exc.nbd_error == proto.NBD_EPERM
    assert exc.strerror == "read-only"
    opt = OptionError(proto.NBD_OPT_GO, proto.NBD_REP_ERR_UNKNOWN, "no such export")
    assert "GO" in str(opt) and opt.reply == proto.NBD_REP_ERR_UNKNOWN
    assert issubclass(ProtocolError, NbdError)


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        (Capabilities(), (1, 4096, 32 * 1024 * 1024)),
        (Capabilities(min_block=512, max_block=65536), (512, 4096, 65536)),
        # Invalid values are made valid rather than sent as they are.
        (Capabilities(min_block=3, preferred_block=100, max_block=1000), (4, 512, 1000)),
        (Capabilities(min_block=1 << 20, preferred_block=4096), (65536, 65536, 32 * 1024 * 1024)),
        (Capabilities(max_block=1 << 40), (1, 4096, 1 << 31)),
        (Capabilities(max_block=100), (1, 4096, 4096)),
    ],
)
def test_block_sizes_are_valid(caps: Capabilities, expected: tuple[int, int, int]) -> None:
    minimum, preferred, maximum = block_sizes(caps)
    assert (minimum, preferred, maximum) == expected
    assert minimum & (minimum - 1) == 0 and minimum <= 65536
    assert preferred & (preferred - 1) == 0 and preferred >= max(minimum, 512)
    assert maximum % minimum == 0 and maximum >= preferred
