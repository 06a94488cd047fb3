"""The drove NBD server against real NBD clients and against malformed traffic.

The server runs in-process on a background event loop (tests/nbdtools.py);
every client is a real program run as a subprocess: nbdinfo, qemu-io,
qemu-img, nbdcopy, fio (ioengine=nbd) and nbdsh (libnbd).  Raw-socket tests
send what no well-behaved client would.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drove.nbd import proto
from drove.nbd.export import NBD_STATE_HOLE, NBD_STATE_ZERO, Capabilities
from drove.nbd.memory import MemoryExport
from drove.service import new_event_loop

# tests/nbdtools.py holds the helpers shared by the NBD tests; tests/ is not a package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nbdtools import (
    CountingProvider,
    DelayedExport,
    FailingExport,
    RawClient,
    ServerThread,
    make_tls_dir,
    nbdsh,
    run,
    server_tls_context,
)

SIZE = 16 * 1024 * 1024
PATTERN = bytes(range(256)) * 16  # 4 KiB, every byte position distinct mod 256

# Tools missing is a failure, not a skip (tests/conftest.py checks them).
pytestmark = pytest.mark.timeout(120)


def make_provider() -> CountingProvider:
    """The exports every test starts with (fresh memory each time)."""
    ro = MemoryExport(SIZE, "ro", "read-only export", readonly=True)
    ro.data[:] = PATTERN * (SIZE // len(PATTERN))
    ro.allocated[:] = b"\x01" * len(ro.allocated)
    return CountingProvider(
        [
            MemoryExport(SIZE, "", "default export"),
            ro,
            MemoryExport(SIZE, "nofast", "no fast zero", fast_zero=False),
            DelayedExport(SIZE, "slow", "random delays", max_delay=0.001),
            MemoryExport(
                SIZE, "blocks", "512..64K blocks", caps=Capabilities(min_block=512, max_block=65536)
            ),
        ],
        default="",
    )


LOOPS = {"uvloop": new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture
def srv(tmp_path: Path):
    """A server with the standard exports on TCP and a unix socket (uvloop)."""
    with ServerThread(make_provider(), unix_path=tmp_path / "nbd.sock") as server:
        yield server


@pytest.fixture(params=sorted(LOOPS))
def srv_loops(request: pytest.FixtureRequest, tmp_path: Path):
    """Like ``srv``, once on uvloop and once on the plain asyncio loop."""
    server = ServerThread(
        make_provider(), unix_path=tmp_path / "nbd.sock", loop_factory=LOOPS[request.param]
    )
    with server:
        yield server


def export(srv: ServerThread, name: str = "") -> MemoryExport:
    """The in-process export behind ``name``."""
    exp = srv.provider.exports[name]
    assert isinstance(exp, MemoryExport)
    return exp


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run qemu-io commands against a raw NBD image."""
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    return run([*args, uri], check=check)


def assert_serving(srv: ServerThread, name: str = "ro") -> None:
    """A fresh connection still negotiates and reads the expected data."""
    with RawClient(srv.host, srv.port) as c:
        size, _ = c.connect(name, structured=True)
        assert size == SIZE
        c.request(proto.NBD_CMD_READ, handle=7, offset=4096, length=4096)
        handle, err, data = c.reply(4096)
        assert (handle, err) == (7, 0)
        assert data == bytes(export(srv, name).data[4096:8192])


# --- nbdinfo ---------------------------------------------------------------------


def test_nbdinfo_reports_size_flags_and_contexts(srv: ServerThread) -> None:
    info = json.loads(run(["nbdinfo", "--json", srv.uri()]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False and info["structured"] is True
    (exp,) = info["exports"]
    assert exp["export-size"] == SIZE
    assert exp["description"] == "default export"
    assert exp["contexts"] == ["base:allocation"]
    assert exp["is_read_only"] is False
    for flag in (
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ):
        assert exp[flag] is True, flag
    assert (exp["block_size_minimum"], exp["block_size_preferred"]) == (1, 4096)
    assert exp["block_size_maximum"] == 32 * 1024 * 1024

    ro = json.loads(run(["nbdinfo", "--json", srv.uri("ro")]).stdout)["exports"][0]
    assert ro["is_read_only"] is True
    # Write-side features are not advertised on a read-only export.
    assert not ro["can_trim"] and not ro["can_zero"] and not ro["can_fua"]
    assert ro["can_flush"] and ro["can_cache"]


def test_nbdinfo_list_over_unix_socket(srv: ServerThread) -> None:
    listing = json.loads(run(["nbdinfo", "--list", "--json", srv.unix_uri()]).stdout)
    names = {e["export-name"]: e["description"] for e in listing["exports"]}
    assert names == {
        "": "default export",
        "ro": "read-only export",
        "nofast": "no fast zero",
        "slow": "random delays",
        "blocks": "512..64K blocks",
    }
    # Plain text output of a single export over TCP agrees on the size.
    text = run(["nbdinfo", "--size", srv.uri("nofast")]).stdout
    assert int(text) == SIZE


def test_nbdinfo_map_matches_what_was_written(srv: ServerThread) -> None:
    qemu_io(
        srv.uri(),
        "write -P 0x11 0 4096",
        "write -P 0x22 1M 64K",
        "discard 1040K 16K",  # a hole in the middle of the 64K
        "write -P 0x33 8190K 2K",  # unaligned: touches one block
        "write -P 0x44 12M 1M",
        "write -z -u 12M 1M",  # write zeroes, may trim -> hole again
        "write -z 14M 4K",  # NO_HOLE: allocated zeroes
    )
    extents = json.loads(run(["nbdinfo", "--map", "--json", srv.uri()]).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in extents]
    hole = NBD_STATE_HOLE | NBD_STATE_ZERO
    kib = 1024
    expected = [
        (0, 4 * kib, 0),
        (4 * kib, 1020 * kib, hole),
        (1024 * kib, 16 * kib, 0),
        (1040 * kib, 16 * kib, hole),
        (1056 * kib, 32 * kib, 0),
        (1088 * kib, 8188 * kib - 1088 * kib, hole),
        (8188 * kib, 4 * kib, 0),
        (8192 * kib, 6 * 1024 * kib, hole),
        (14 * 1024 * kib, 4 * kib, 0),
        (14 * 1024 * kib + 4 * kib, 2 * 1024 * kib - 4 * kib, hole),
    ]
    assert got == expected
    # The server's view and the export's own bookkeeping agree.
    mine = [(e.length, e.flags) for e in export(srv).extents()]
    assert mine == [(length, flags) for _, length, flags in expected]


# --- qemu-io, qemu-img, nbdcopy ------------------------------------------------------


def test_qemu_io_unaligned_writes_and_reads(srv: ServerThread) -> None:
    qemu_io(
        srv.uri(),
        "write -P 0x5a 1000 3000",
        "write -P 0xa5 3999 3",
        "write -P 0x77 65535 70000",
        "read -P 0x5a 1000 2999",
        "read -P 0xa5 3999 3",
        "read -P 0x00 4002 61533",
        "read -P 0x77 65535 70000",
        "read -P 0x00 0 1000",
    )
    data = export(srv).data
    assert data[:1000] == bytes(1000)
    assert data[1000:3999] == b"\x5a" * 2999
    assert data[3999:4002] == b"\xa5" * 3
    assert data[65535:135535] == b"\x77" * 70000
    # A wrong pattern must fail: qemu-io reports the mismatch.
    out = qemu_io(srv.uri(), "read -P 0x5b 1000 10", check=False)
    assert "Pattern verification failed" in out.stdout + out.stderr


def test_qemu_img_convert_and_compare(srv: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    content = bytearray(SIZE)
    for i, off in enumerate(range(0, SIZE, 1024 * 1024 + 12345)):
        content[off : off + 70000] = os.urandom(70000)[: len(content[off : off + 70000])]
        content[off + 200000 + i] = 0xFF
    src.write_bytes(content)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri()])
    assert export(srv).data == content
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri()])
    # Change one byte behind qemu's back: compare must notice.
    srv.call(export(srv).write, SIZE - 1, memoryview(b"\x01"))
    differ = run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri()], check=False
    )
    assert differ.returncode == 1, differ.stdout + differ.stderr
    out = tmp_path / "out.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.unix_uri(), str(out)])
    expected = bytes(content[:-1]) + b"\x01"
    assert out.read_bytes() == expected


def test_nbdcopy_multi_conn(srv: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    content = os.urandom(SIZE // 2) + bytes(SIZE // 4) + os.urandom(SIZE // 4)
    src.write_bytes(content)
    before = srv.provider.opened.get("", 0)
    run(["nbdcopy", "--connections=4", "--threads=4", "--requests=16", str(src), srv.uri()])
    assert export(srv).data == content
    # nbdcopy only fans out when the server advertises CAN_MULTI_CONN.
    assert srv.provider.opened.get("", 0) - before >= 4
    dst = tmp_path / "dst.img"
    run(["nbdcopy", "--connections=4", srv.unix_uri(), str(dst)])
    assert dst.read_bytes() == content


def test_nbdcopy_zeroes_holes_larger_than_the_maximum_block(srv: ServerThread,
                                                            tmp_path: Path) -> None:
    # nbdcopy zeroes a whole hole with one request, whatever block sizes were agreed.
    exp = export(srv, "blocks")
    exp.data[:] = b"\xaa" * SIZE
    src = tmp_path / "holey.img"
    content = os.urandom(65536) + bytes(SIZE - 2 * 65536) + os.urandom(65536)
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.write(content[:65536])
        f.seek(SIZE - 65536)
        f.write(content[-65536:])
    run(["nbdcopy", str(src), srv.uri("blocks")])
    assert exp.data == content


# --- fio: pipelined, verified I/O ---------------------------------------------------------


def fio(uri: str, *extra: str) -> dict:
    """Run one fio job with the nbd engine and return its JSON job record."""
    args = [
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--output-format=json",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--size=8M",
        "--verify_state_save=0",  # else fio leaves a state file in the working directory
        *extra,
    ]
    out = run(args, timeout=90).stdout
    result = json.loads(out[out.index("{") :])  # fio's nbd engine prints a line first
    (job,) = result["jobs"]
    assert job["error"] == 0, job
    return job


def test_fio_verify_pipelined(srv_loops: ServerThread) -> None:
    srv = srv_loops
    job = fio(srv.uri(), "--rw=randwrite", "--bs=4k")
    assert job["write"]["io_bytes"] == 8 * 1024 * 1024
    assert job["read"]["io_bytes"] == 8 * 1024 * 1024  # the verify pass
    # Mixed sizes over the unix socket.
    fio(srv.unix_uri(), "--rw=write", "--bsrange=512-128k", "--offset=8M")


def test_fio_verify_out_of_order(srv_loops: ServerThread) -> None:
    srv = srv_loops
    slow = export(srv, "slow")
    job = fio(srv.uri("slow"), "--rw=randwrite", "--bs=16k")
    assert job["write"]["io_bytes"] == 8 * 1024 * 1024
    # Large payloads take the direct-receive path; with suspending writes too.
    fio(srv.uri("slow"), "--rw=randwrite", "--bsrange=4k-1m", "--offset=8M")
    # The export really ran requests concurrently (so replies were reordered).
    assert slow.peak > 4


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA, server and client certificates."""
    return make_tls_dir(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_tls_with_nbdinfo_and_qemu_img(tls_dir: Path, tmp_path: Path, loop: str) -> None:
    provider = make_provider()
    tls = server_tls_context(tls_dir)
    with ServerThread(provider, tls=tls, loop_factory=LOOPS[loop]) as srv:
        uri = srv.uri(scheme="nbds", query=f"tls-certificates={tls_dir}")
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
        assert info["TLS"] is True
        assert info["exports"][0]["export-size"] == SIZE
        src = tmp_path / "src.img"
        content = os.urandom(1024 * 1024)
        src.write_bytes(content)
        creds = f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=client"
        target = f"driver=nbd,host=127.0.0.1,port={srv.port},export=,tls-creds=tls0"
        run(
            [
                "qemu-img",
                "convert",
                "-n",
                "--object",
                creds,
                "-f",
                "raw",
                "--target-image-opts",
                str(src),
                target,
            ]
        )
        assert export(srv).data[: len(content)] == content
        # A plain client may still connect: TLS is optional here.
        assert json.loads(run(["nbdinfo", "--json", srv.uri()]).stdout)["TLS"] is False
        # A client trusting another CA fails the TLS handshake; the server lives on.
        other = make_tls_dir(tmp_path / "other-ca")
        bad = srv.uri(scheme="nbds", query=f"tls-certificates={other}")
        assert run(["nbdinfo", bad], check=False).returncode != 0
        assert_serving(srv)


def test_tls_required_refuses_plain_clients(tls_dir: Path) -> None:
    with ServerThread(make_provider(), tls=server_tls_context(tls_dir), tls_required=True) as srv:
        plain = run(["nbdinfo", srv.uri()], check=False)
        assert plain.returncode != 0  # (libnbd reports NBD_REP_ERR_TLS_REQD as ENOTSUP)
        with RawClient(srv.host, srv.port) as c:
            c.greeting()
            c.option(proto.NBD_OPT_LIST)
            assert c.option_reply()[1] == proto.NBD_REP_ERR_TLS_REQD
            c.option(proto.NBD_OPT_STRUCTURED_REPLY)
            assert c.option_reply()[1] == proto.NBD_REP_ERR_TLS_REQD
            # EXPORT_NAME cannot be refused politely: the server hangs up.
            c.option(proto.NBD_OPT_EXPORT_NAME, b"")
            assert c.closed_by_server()
        uri = srv.uri(scheme="nbds", query=f"tls-certificates={tls_dir}")
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
        assert info["TLS"] is True


# --- nbdsh edge cases (libnbd with strict mode off) -------------------------------------

EDGE_SCRIPT = r"""
import json
h.set_strict_mode(0)
{setup}
h.connect_uri({uri!r})
size = h.get_size()
out = {{}}
def attempt(name, fn):
    try:
        r = fn()
        out[name] = "OK" if not isinstance(r, (bytes, bytearray)) else "OK:%d" % len(r)
    except nbd.Error as e:
        out[name] = e.errno or e.string
{body}
print(json.dumps(out))
"""


def edge(srv: ServerThread, name: str, body: str, setup: str = "") -> dict[str, str]:
    script = EDGE_SCRIPT.format(uri=srv.uri(name), body=body, setup=setup)
    return json.loads(nbdsh(script).strip().splitlines()[-1])


def test_nbdsh_bad_requests_leave_data_unchanged(srv: ServerThread) -> None:
    rw = export(srv)
    rw.data[:] = PATTERN * (SIZE // len(PATTERN))
    before = bytes(rw.data)
    result = edge(
        srv,
        "",
        """
attempt("read past end", lambda: h.pread(4096, size - 2048))
attempt("read offset past end", lambda: h.pread(512, size + 4096))
attempt("write past end", lambda: h.pwrite(b"x" * 4096, size - 2048))
attempt("trim past end", lambda: h.trim(8192, size - 4096))
attempt("zero past end", lambda: h.zero(8192, size - 4096))
attempt("cache past end", lambda: h.cache(8192, size - 4096))
attempt("write bad flag", lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_REQ_ONE))
attempt("read unknown flag", lambda: h.pread(512, 0, 1 << 9))
attempt("trim bad flag", lambda: h.trim(4096, 0, nbd.CMD_FLAG_NO_HOLE))
attempt("flush bad flag", lambda: h.flush(nbd.CMD_FLAG_DF))
attempt("read too long", lambda: h.pread(64 * 1024 * 1024, 0))
attempt("zero len read", lambda: h.pread(0, 4096))
attempt("zero len read at end", lambda: h.pread(0, size))
attempt("zero len write", lambda: h.pwrite(b"", 4096))
attempt("zero len trim", lambda: h.trim(0, 4096))
attempt("zero len zero", lambda: h.zero(0, 4096))
attempt("zero len cache", lambda: h.cache(0, 4096))
attempt("still reads", lambda: h.pread(4096, 4096))
""",
    )
    assert result == {
        "read past end": "EINVAL",
        "read offset past end": "EINVAL",
        "write past end": "ENOSPC",
        "trim past end": "EINVAL",
        "zero past end": "ENOSPC",
        "cache past end": "EINVAL",
        "write bad flag": "EINVAL",
        "read unknown flag": "EINVAL",
        "trim bad flag": "EINVAL",
        "flush bad flag": "EINVAL",
        "read too long": "EINVAL",
        "zero len read": "OK:0",
        "zero len read at end": "OK:0",
        "zero len write": "OK",
        "zero len trim": "OK",
        "zero len zero": "OK",
        "zero len cache": "OK",
        "still reads": "OK:4096",
    }
    assert rw.data == before
    assert_serving(srv)


def test_nbdsh_read_only_export(srv: ServerThread) -> None:
    ro = export(srv, "ro")
    before = bytes(ro.data)
    result = edge(
        srv,
        "ro",
        """
attempt("write", lambda: h.pwrite(b"z" * 4096, 0))
attempt("write fua", lambda: h.pwrite(b"z" * 4096, 0, nbd.CMD_FLAG_FUA))
attempt("trim", lambda: h.trim(4096, 0))
attempt("zero", lambda: h.zero(4096, 0))
attempt("flush", lambda: h.flush())
attempt("read", lambda: h.pread(4096, 8192))
attempt("read fua", lambda: h.pread(4096, 8192, nbd.CMD_FLAG_FUA))
""",
    )
    assert result == {
        "write": "EPERM",
        "write fua": "EPERM",
        "trim": "EPERM",
        "zero": "EPERM",
        "flush": "OK",
        "read": "OK:4096",
        "read fua": "EINVAL",  # FUA is not advertised on a read-only export
    }
    assert ro.data == before


def test_nbdsh_block_status_and_fast_zero(srv: ServerThread) -> None:
    qemu_io(srv.uri("nofast"), "write -P 1 64K 64K")
    nofast = export(srv, "nofast")
    before = bytes(nofast.data)
    result = edge(
        srv,
        "nofast",
        setup='h.add_meta_context("base:allocation")',
        body="""
seen = []
def cb(ctx, offset, entries, err):
    seen.append([ctx, offset, list(entries)])
    return 0
attempt("status", lambda: h.block_status(256 * 1024, 0, cb))
attempt("status req_one", lambda: h.block_status(256 * 1024, 0, cb, nbd.CMD_FLAG_REQ_ONE))
attempt("status zero len", lambda: h.block_status(0, 0, cb))
attempt("status past end", lambda: h.block_status(8192, size - 4096, cb))
attempt("fast zero", lambda: h.zero(64 * 1024, 4096, nbd.CMD_FLAG_FAST_ZERO))
attempt("slow zero", lambda: h.zero(128 * 1024, 4096, nbd.CMD_FLAG_NO_HOLE))
out["seen"] = seen
""",
    )
    seen = result.pop("seen")
    assert result == {
        "status": "OK",
        "status req_one": "OK",
        "status zero len": "EINVAL",
        "status past end": "EINVAL",
        "fast zero": "ENOTSUP",  # the export refuses, the server passes it through
        "slow zero": "OK",
    }
    hole = NBD_STATE_HOLE | NBD_STATE_ZERO
    assert seen == [
        ["base:allocation", 0, [65536, hole, 65536, 0, 131072, hole]],
        ["base:allocation", 0, [65536, hole]],
    ]
    assert nofast.data[:4096] == before[:4096]
    assert nofast.data[4096 : 4096 + 128 * 1024] == bytes(128 * 1024)


def test_nbdsh_block_status_without_negotiation(srv: ServerThread) -> None:
    result = edge(
        srv,
        "",
        """
attempt("status", lambda: h.block_status(4096, 0, lambda *a: 0))
attempt("read", lambda: h.pread(512, 0))
""",
    )
    assert result == {"status": "EINVAL", "read": "OK:512"}


def test_nbdsh_simple_replies_and_export_name(srv: ServerThread) -> None:
    """Without structured replies (and with the old EXPORT_NAME path) errors still work."""
    result = edge(
        srv,
        "",
        setup="h.set_request_structured_replies(False)\n"
        "h.set_handshake_flags(0)\n"
        "h.set_opt_mode(False)",
        body="""
out["structured"] = h.get_structured_replies_negotiated()
attempt("read past end", lambda: h.pread(4096, size))
attempt("write", lambda: h.pwrite(b"q" * 1000, 10))
attempt("read", lambda: h.pread(1000, 10))
""",
    )
    assert result == {
        "structured": False,
        "read past end": "EINVAL",
        "write": "OK",
        "read": "OK:1000",
    }
    assert export(srv).data[10:1010] == b"q" * 1000


# --- Raw sockets: garbage and protocol corner cases ---------------------------------------


def test_raw_bogus_option_then_go(srv: ServerThread) -> None:
    with RawClient(srv.host, srv.port) as c:
        assert c.greeting() == proto.NBD_FLAG_FIXED_NEWSTYLE | proto.NBD_FLAG_NO_ZEROES
        c.option(0xDEAD, b"some bytes")
        assert c.option_reply()[:2] == (0xDEAD, proto.NBD_REP_ERR_UNSUP)
        c.option(proto.NBD_OPT_EXTENDED_HEADERS)
        assert c.option_reply()[1] == proto.NBD_REP_ERR_UNSUP
        c.option(proto.NBD_OPT_STARTTLS)  # no TLS configured
        assert c.option_reply()[1] == proto.NBD_REP_ERR_UNSUP
        c.option(proto.NBD_OPT_LIST, b"x")  # LIST takes no data
        assert c.option_reply()[1] == proto.NBD_REP_ERR_INVALID
        c.option(proto.NBD_OPT_GO, b"\x00\x00\x00\xff")  # name longer than the data
        assert c.option_reply()[1] == proto.NBD_REP_ERR_INVALID
        c.option(proto.NBD_OPT_GO, struct.pack(">I", 4) + b"nope" + b"\x00\x00")
        assert c.option_reply()[1] == proto.NBD_REP_ERR_UNKNOWN
        # Meta contexts need structured replies first.
        query = struct.pack(">I", 0) + struct.pack(">I", 1)
        query += struct.pack(">I", 15) + b"base:allocation"
        c.option(proto.NBD_OPT_SET_META_CONTEXT, query)
        assert c.option_reply()[1] == proto.NBD_REP_ERR_INVALID
        size, flags = c.go("ro")
        assert size == SIZE and flags & proto.NBD_FLAG_READ_ONLY
        assert not flags & proto.NBD_FLAG_SEND_DF  # DF needs structured replies
        c.request(proto.NBD_CMD_READ, offset=0, length=16)
        assert c.reply(16) == (1, 0, PATTERN[:16])


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(struct.pack(">I", 0xFF), id="unknown-client-flags"),
        pytest.param(struct.pack(">I", 3) + b"NOTMAGIC" + bytes(8), id="bad-option-magic"),
        pytest.param(
            struct.pack(">I", 3) + proto.OPTION_HEADER.pack(proto.IHAVEOPT, 7, 0xFFFFFFFF),
            id="huge-option",
        ),
        pytest.param(
            struct.pack(">I", 3) + proto.OPTION_HEADER.pack(proto.IHAVEOPT, 1, 3) + b"zz",
            id="unknown-export-name",
        ),
    ],
)
def test_raw_handshake_garbage_disconnects(srv: ServerThread, garbage: bytes) -> None:
    with RawClient(srv.host, srv.port) as c:
        c.recv_exact(18)
        c.send(garbage)
        if garbage.endswith(b"zz"):
            c.send(b"z")  # complete the 3-byte name of the unknown export
        assert c.closed_by_server()
    assert_serving(srv)


def test_raw_truncated_handshake_and_abort(srv: ServerThread) -> None:
    with RawClient(srv.host, srv.port) as c:
        c.recv_exact(18)
        c.send(b"\x00\x00")  # half of the client flags, then hang up
    with RawClient(srv.host, srv.port) as c:
        c.greeting()
        c.option(proto.NBD_OPT_ABORT)
        assert c.option_reply()[1] == proto.NBD_REP_ACK
        assert c.closed_by_server()
    assert_serving(srv)


def _req(cmd: int, length: int, magic: int = proto.NBD_REQUEST_MAGIC) -> bytes:
    return proto.REQUEST.pack(magic, 0, cmd, 1, 0, length)


@pytest.mark.parametrize(
    ("request_bytes", "client_hangs_up"),
    [
        pytest.param(_req(proto.NBD_CMD_READ, 512, magic=0x12345678), False, id="bad-magic"),
        pytest.param(os.urandom(1000), False, id="random-bytes"),
        pytest.param(_req(proto.NBD_CMD_WRITE, 0xFFFFFFF0) + bytes(4096), False, id="huge-write"),
        # The client dies in the middle of a request: the connection just ends.
        pytest.param(_req(proto.NBD_CMD_READ, 512)[:13], True, id="truncated-header"),
        pytest.param(
            _req(proto.NBD_CMD_WRITE, 4096) + b"\xee" * 1000, True, id="truncated-small-payload"
        ),
        pytest.param(
            _req(proto.NBD_CMD_WRITE, 1 << 20) + b"\xee" * 100000, True, id="truncated-big-payload"
        ),
    ],
)
def test_raw_transmission_garbage(
    srv: ServerThread, request_bytes: bytes, client_hangs_up: bool
) -> None:
    rw = export(srv)
    rw.data[: len(PATTERN)] = PATTERN
    before = bytes(rw.data)
    with RawClient(srv.host, srv.port) as c:
        c.connect("", structured=True)
        c.send(request_bytes)
        if client_hangs_up:
            time.sleep(0.05)  # let the server parse what it got
            c.sock.shutdown(socket.SHUT_RDWR)
        else:
            assert c.closed_by_server()
    assert rw.data == before
    assert_serving(srv)
    deadline = time.monotonic() + 5
    while srv.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.connections == 0  # nothing lingers


def test_raw_refused_writes_consume_their_payload(srv: ServerThread) -> None:
    rw = export(srv)
    before = bytes(rw.data)
    with RawClient(srv.host, srv.port) as c:
        c.connect("", structured=False)
        # Past the end: ENOSPC, and the 64 KiB payload must be skipped.
        c.request(
            proto.NBD_CMD_WRITE, handle=1, offset=SIZE - 4096, length=65536, payload=b"\xee" * 65536
        )
        assert c.reply() == (1, proto.NBD_ENOSPC, b"")
        # As long as the spec's DoS threshold (32 MiB): still skipped.
        big = 32 * 1024 * 1024
        c.request(proto.NBD_CMD_WRITE, handle=2, offset=SIZE, length=big, payload=b"\xee" * big)
        assert c.reply() == (2, proto.NBD_ENOSPC, b"")
        # Unknown commands and bad flags: EINVAL, connection stays usable.
        c.request(42, handle=3, offset=0, length=4096)
        assert c.reply() == (3, proto.NBD_EINVAL, b"")
        c.request(
            proto.NBD_CMD_WRITE,
            handle=4,
            flags=proto.NBD_CMD_FLAG_DF,
            length=512,
            payload=b"\xee" * 512,
        )
        assert c.reply() == (4, proto.NBD_EINVAL, b"")
        c.request(proto.NBD_CMD_FLUSH, handle=5, offset=1)
        assert c.reply() == (5, proto.NBD_EINVAL, b"")
        # DF without structured replies was never advertised.
        c.request(proto.NBD_CMD_READ, handle=6, flags=proto.NBD_CMD_FLAG_DF, length=512)
        assert c.reply() == (6, proto.NBD_EINVAL, b"")
        c.request(proto.NBD_CMD_READ, handle=7, length=8)
        assert c.reply(8) == (7, 0, bytes(8))
    assert rw.data == before
    blocks = export(srv, "blocks")
    with RawClient(srv.host, srv.port) as c:
        c.connect("blocks")
        # Longer than this export's maximum block size: EINVAL, payload skipped.
        c.request(proto.NBD_CMD_WRITE, handle=1, length=131072, payload=b"\xee" * 131072)
        assert c.reply() == (1, proto.NBD_EINVAL, b"")
        c.request(proto.NBD_CMD_READ, handle=2, length=131072)
        assert c.reply() == (2, proto.NBD_EINVAL, b"")
        # Not aligned to the 512-byte minimum block size: EINVAL.
        c.request(proto.NBD_CMD_WRITE, handle=3, offset=100, length=512, payload=b"\xee" * 512)
        assert c.reply() == (3, proto.NBD_EINVAL, b"")
        c.request(proto.NBD_CMD_READ, handle=4, offset=512, length=100)
        assert c.reply() == (4, proto.NBD_EINVAL, b"")
        c.request(proto.NBD_CMD_WRITE, handle=5, offset=512, length=512, payload=b"\x01" * 512)
        assert c.reply() == (5, 0, b"")
        # TRIM and WRITE_ZEROES have no maximum without negotiated block sizes.
        c.request(proto.NBD_CMD_WRITE_ZEROES, handle=6, offset=0, length=SIZE)
        assert c.reply() == (6, 0, b"")
    assert blocks.data == bytes(SIZE)
    with RawClient(srv.host, srv.port) as c:
        c.connect("ro")
        c.request(proto.NBD_CMD_WRITE, handle=9, offset=0, length=4096, payload=b"\xee" * 4096)
        assert c.reply() == (9, proto.NBD_EPERM, b"")
        c.request(proto.NBD_CMD_WRITE_ZEROES, handle=10, offset=0, length=4096)
        assert c.reply() == (10, proto.NBD_EPERM, b"")
        c.request(proto.NBD_CMD_READ, handle=11, length=8)
        assert c.reply(8) == (11, 0, PATTERN[:8])


def test_raw_fragmented_and_pipelined_requests(srv_loops: ServerThread) -> None:
    """Requests cut at every possible point (and glued to the handshake) parse the same."""
    srv = srv_loops
    rng = random.Random(7)
    rw = export(srv)
    # Large payloads back to back (each received into its own buffer, the read after
    # one kept short), then small ones again.
    writes = [(0, 1), (4095, 4097), (65536, 70000), (300000, 65536), (1 << 20, 1 << 20),
              (2 << 20, 100000), (3 << 20, 300000), (5000, 10), (3 << 20, 70000)]
    batch = bytearray()
    expected = bytearray(SIZE)
    for handle, (offset, length) in enumerate(writes):
        payload = rng.randbytes(length)
        expected[offset : offset + length] = payload
        batch += proto.REQUEST.pack(
            proto.NBD_REQUEST_MAGIC, 0, proto.NBD_CMD_WRITE, handle, offset, length
        )
        batch += payload
    batch += proto.REQUEST.pack(proto.NBD_REQUEST_MAGIC, 0, proto.NBD_CMD_READ, 99, 4000, 200)
    with RawClient(srv.host, srv.port) as c:
        c.greeting()
        c.option(proto.NBD_OPT_STRUCTURED_REPLY)
        assert c.option_reply()[1] == proto.NBD_REP_ACK
        go = struct.pack(">I", 0) + struct.pack(">H", 0)
        # GO and the first bytes of the first request in one segment.
        c.send(proto.OPTION_HEADER.pack(proto.IHAVEOPT, proto.NBD_OPT_GO, len(go)) + go + batch[:5])
        pos = 5
        while pos < len(batch):
            step = rng.choice((1, 3, 27, 28, 29, 500, 4096, 65536, 200000))
            c.send(batch[pos : pos + step])
            pos += step
            if rng.random() < 0.2:
                time.sleep(0.001)  # let the server see a partial request
        while True:
            _, reply, _ = c.option_reply()
            if reply == proto.NBD_REP_ACK:
                break
        replies = {}
        for _ in range(len(writes) + 1):
            handle, err, data = c.reply()
            replies[handle] = (err, data)
        assert replies == {
            **{h: (0, b"") for h in range(len(writes))},
            99: (0, expected[4000:4200]),
        }
    assert rw.data == expected


def test_raw_replies_out_of_order_and_disc_waits(srv: ServerThread) -> None:
    slow = export(srv, "slow")
    slow.data[:8192] = b"A" * 4096 + b"B" * 4096
    slow.slow_offsets[0] = 0.3
    with RawClient(srv.host, srv.port) as c:
        c.connect("slow", structured=True)
        c.request(proto.NBD_CMD_READ, handle=1, offset=0, length=4096)
        c.request(proto.NBD_CMD_READ, handle=2, offset=4096, length=4096)
        assert c.reply() == (2, 0, b"B" * 4096)
        assert c.reply() == (1, 0, b"A" * 4096)
        # DISC must still answer the request in flight before closing.
        c.request(proto.NBD_CMD_READ, handle=3, offset=0, length=4096)
        c.request(proto.NBD_CMD_DISC, handle=4)
        assert c.reply() == (3, 0, b"A" * 4096)
        assert c.closed_by_server()


def test_raw_backpressure_bounds_in_flight_requests(tmp_path: Path) -> None:
    slow = DelayedExport(SIZE, "slow", max_delay=0.002)
    with ServerThread(CountingProvider([slow]), max_inflight_requests=4) as srv:
        with RawClient(srv.host, srv.port) as c:
            c.connect("slow", structured=True)
            batch = b"".join(
                proto.REQUEST.pack(
                    proto.NBD_REQUEST_MAGIC, 0, proto.NBD_CMD_WRITE, i, i * 4096, 4096
                )
                + bytes([i]) * 4096
                for i in range(64)
            )
            c.send(batch)
            handles = sorted(c.reply()[0] for _ in range(64))
            assert handles == list(range(64))
        assert 1 < slow.peak <= 4
        assert all(slow.data[i * 4096] == i for i in range(64))


def test_raw_export_errors_are_mapped(tmp_path: Path) -> None:
    cases = [
        (OSError(errno.EIO, "disk on fire"), proto.NBD_EIO),
        (OSError(errno.EDQUOT, "quota"), proto.NBD_ENOSPC),
        (OSError(errno.ENOTSUP, "nope"), proto.NBD_EINVAL),  # not a FAST_ZERO request
        (OSError(errno.ETIMEDOUT, "replica timeout"), proto.NBD_EIO),
        (RuntimeError("bug"), proto.NBD_EIO),
    ]
    for exc, expected in cases:
        bad = FailingExport(SIZE, "bad", bad_offset=8192, error=exc)
        with ServerThread(CountingProvider([bad])) as srv, RawClient(srv.host, srv.port) as c:
            c.connect("bad", structured=True)
            c.request(proto.NBD_CMD_READ, handle=1, offset=8192, length=512)
            assert c.reply() == (1, expected, b""), exc
            c.request(proto.NBD_CMD_WRITE, handle=2, offset=8192, length=4, payload=b"abcd")
            assert c.reply() == (2, expected, b""), exc
            c.request(proto.NBD_CMD_READ, handle=3, offset=0, length=4)
            assert c.reply() == (3, 0, bytes(4))


def test_server_close_finishes_in_flight_requests() -> None:
    slow = DelayedExport(SIZE, "slow", max_delay=0)
    slow.slow_offsets[0] = 0.5
    srv = ServerThread(CountingProvider([slow])).start()
    try:
        with RawClient(srv.host, srv.port) as c:
            c.connect("slow", structured=True)
            c.request(proto.NBD_CMD_READ, handle=1, offset=0, length=4096)
            time.sleep(0.1)  # the read is in flight now
            assert srv.loop is not None and srv.server is not None
            closing = asyncio.run_coroutine_threadsafe(srv.server.close(), srv.loop)
            time.sleep(0.1)
            # New requests are refused while the server drains.
            c.request(proto.NBD_CMD_READ, handle=2, offset=4096, length=4096)
            replies = {c.reply()[:2] for _ in range(2)}
            assert replies == {(1, 0), (2, proto.NBD_ESHUTDOWN)}
            assert c.closed_by_server()
            closing.result(timeout=5)
    finally:
        srv.stop()


def test_handshake_timeout_and_server_close(tmp_path: Path) -> None:
    srv = ServerThread(
        CountingProvider([MemoryExport(SIZE, "")]),
        handshake_timeout=0.5,
        unix_path=tmp_path / "s.sock",
    ).start()
    try:
        with RawClient(srv.host, srv.port) as idle:
            idle.recv_exact(18)
            start = time.monotonic()
            assert idle.closed_by_server(timeout=5)
            assert time.monotonic() - start < 3
        live = RawClient(srv.host, srv.port)
        live.connect("")
        assert srv.connections == 1
    finally:
        srv.stop()
    assert live.closed_by_server()
    live.close()
    assert not (tmp_path / "s.sock").exists()


def test_standalone_memory_server(tmp_path: Path) -> None:
    """``python -m drove.nbd.memory`` prints its addresses, serves, and stops on SIGTERM."""
    sock = tmp_path / "mem.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "drove.nbd.memory",
            "--size",
            "4M",
            "--port",
            "0",
            "--unix",
            str(sock),
            "--name",
            "a",
            "--name",
            "b",
            "--readonly",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["size"] == 4 * 1024 * 1024 and info["exports"] == ["a", "b"]
        listing = json.loads(
            run(["nbdinfo", "--list", "--json", f"nbd://{info['host']}:{info['port']}/"]).stdout
        )
        assert sorted(e["export-name"] for e in listing["exports"]) == ["a", "b"]
        exp = json.loads(run(["nbdinfo", "--json", f"nbd+unix:///b?socket={sock}"]).stdout)
        assert exp["exports"][0]["is_read_only"] is True
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not sock.exists()


# --- drove's shared arena (engine -> same-host replica) ---------------------------------------


def test_arena_writes_and_who_may_share_an_arena(tmp_path: Path) -> None:
    from drove.nbd.arena import SLOT, Arena

    arena = Arena(slots=4)
    sock = tmp_path / "arena.sock"
    with ServerThread(make_provider(), unix_path=sock, accept_arena=True) as srv:
        rw = export(srv)

        def arena_option(c: RawClient, path: str) -> int:
            c.greeting()
            c.option(proto.NBD_OPT_DROVE_ARENA, path.encode())
            return c.option_reply()[1]

        # Our own drove memfd over the unix socket: accepted; writes come from it.
        with RawClient.unix(sock) as c:
            assert arena_option(c, arena.path) == proto.NBD_REP_ACK
            c.go()
            buf, data = arena.take(200_000)
            buf[:] = random.Random(3).randbytes(200_000)
            where = arena.offset_of(data)
            c.request(proto.NBD_CMD_DROVE_WRITE_ARENA, handle=1, offset=4096, length=200_000,
                      payload=struct.pack(">Q", where))
            assert c.reply()[:2] == (1, 0)
            assert rw.data[4096:4096 + 200_000] == bytes(data)
            before = bytes(rw.data)
            # Out of the arena, or beyond the export: refused, nothing written.
            c.request(proto.NBD_CMD_DROVE_WRITE_ARENA, handle=2, offset=0, length=4096,
                      payload=struct.pack(">Q", 4 * SLOT - 100))
            assert c.reply()[:2] == (2, proto.NBD_EINVAL)
            c.request(proto.NBD_CMD_DROVE_WRITE_ARENA, handle=3, offset=SIZE - 10, length=4096,
                      payload=struct.pack(">Q", 0))
            assert c.reply()[:2] == (3, proto.NBD_ENOSPC)
            assert bytes(rw.data) == before
            arena.give_back(data)
            # A read answered into the arena: a bare reply, the data in the slot.
            buf, data = arena.take(300_000)
            c.request(proto.NBD_CMD_DROVE_READ_ARENA, handle=6, offset=1000, length=300_000,
                      payload=struct.pack(">Q", arena.offset_of(data)))
            assert c.reply() == (6, 0, b"")
            assert bytes(data) == bytes(rw.data[1000:301_000])
            c.request(proto.NBD_CMD_DROVE_READ_ARENA, handle=7, offset=0, length=4096,
                      payload=struct.pack(">Q", 4 * SLOT - 1))
            assert c.reply()[:2] == (7, proto.NBD_EINVAL)
            arena.give_back(data)

        # Not ours, not a memfd of drove's, not a path, or over TCP: refused.
        other = tmp_path / "file"
        other.write_bytes(b"secret")
        fd = os.open(other, os.O_RDONLY)
        try:
            for path in ("/proc/1/fd/0", f"/proc/{os.getpid()}/fd/{fd}", "/etc/passwd", "\xff"):
                with RawClient.unix(sock) as c:
                    assert arena_option(c, path) == proto.NBD_REP_ERR_POLICY, path
        finally:
            os.close(fd)
        with RawClient(srv.host, srv.port) as c:
            assert arena_option(c, arena.path) == proto.NBD_REP_ERR_POLICY

        # Without the option the command is unknown, and the connection goes on.
        with RawClient.unix(sock) as c:
            c.connect()
            c.request(proto.NBD_CMD_DROVE_WRITE_ARENA, handle=4, offset=0, length=4096)
            assert c.reply()[:2] == (4, proto.NBD_EINVAL)
            c.request(proto.NBD_CMD_READ, handle=5, offset=4096, length=16)
            assert c.reply(16) == (5, 0, bytes(rw.data[4096:4112]))

    # A server that does not take arenas (the default) does not know the option.
    with ServerThread(make_provider()) as srv, RawClient(srv.host, srv.port) as c:
        c.greeting()
        c.option(proto.NBD_OPT_DROVE_ARENA, arena.path.encode())
        assert c.option_reply()[1] == proto.NBD_REP_ERR_UNSUP
