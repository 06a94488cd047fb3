"""A replica's NBD exports serve only clients that name its volume's access key.

Real replica and engine processes started with ``DROVE_NBD_KEY`` (as the agent
starts them), real clients (nbdinfo, nbdsh, qemu-io, qemu-img) with and without
the key.
"""

from __future__ import annotations

import json
import socket
import struct

import pytest

from drove.nbd import proto
from drove.replica.access import KEY_ENV, keyed_export, new_key
from replicatools import drove_cmd, nbdinfo_json, nbdsh, qemu_io, run

KEY = new_key()
PATTERN = "write -P 0x5a 1M 1M"


def keyed(uri_base: str, export: str, key: str | None = KEY) -> str:
    """``nbd://H:P/`` + the export with ``key`` in front."""
    return uri_base + keyed_export(key, export)


def go_without_key(host: str, port: int, name: str) -> tuple[int, bytes, bytes]:
    """Raw fixed-newstyle handshake asking NBD_OPT_GO for ``name``: (reply type, message,
    what the server sends after the reply: b"" when it closed the connection)."""
    with socket.create_connection((host, port), timeout=10) as s:
        f = s.makefile("rb")
        greeting = f.read(18)
        assert greeting[:8] == b"NBDMAGIC", greeting
        s.sendall(struct.pack(">I", proto.NBD_FLAG_C_FIXED_NEWSTYLE | proto.NBD_FLAG_C_NO_ZEROES))
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", proto.IHAVEOPT, proto.NBD_OPT_GO, len(data)) + data)
        _magic, _opt, reply, length = struct.unpack(">QIII", f.read(20))
        message = f.read(length)
        return reply, message, f.read(1)


@pytest.fixture
def keyed_env(monkeypatch):
    """Processes started by the test get the volume's key as the agent hands it over."""
    monkeypatch.setenv(KEY_ENV, KEY)


def read_all(uri: str, tmp_path) -> bytes:
    """The whole export, copied by qemu-img."""
    out = tmp_path / "copy.raw"
    run(["qemu-img", "convert", "-O", "raw", uri, str(out)])
    return out.read_bytes()


def test_replica_serves_only_clients_with_the_key(replicas, keyed_env, tmp_path) -> None:
    r = replicas("r1", "16M")
    base = f"nbd://{r.addresses['nbd_host']}:{r.addresses['nbd_port']}/"
    qemu_io(keyed(base, "head"), PATTERN)
    before = read_all(keyed(base, "head"), tmp_path)
    assert before[1 << 20:2 << 20] == b"\x5a" * (1 << 20)

    # No key, a wrong key, the unix socket, a listing: refused, nothing served.
    for uri in (base + "head", base, base + "snapshot/none", keyed(base, "head", new_key()),
                r.unix_uri("head"), r.unix_uri(keyed_export(new_key(), "head"))):
        res = run(["nbdinfo", uri], check=False)
        # libnbd shows NBD_REP_ERR_UNKNOWN as ENOENT, whether the export exists or not.
        assert res.returncode != 0 and b"No such file" in res.stderr, (uri, res.stderr)
    assert run(["nbdinfo", "--list", base], check=False).returncode != 0
    res = nbdsh(base + "head", "h.pwrite(b'x' * 4096, 0)", check=False)
    assert res.returncode != 0 and b"No such file" in res.stderr, res.stderr

    # The refusal is NBD_REP_ERR_UNKNOWN, then the server hangs up.
    host, port = r.addresses["nbd_host"], r.addresses["nbd_port"]
    reply, message, after = go_without_key(host, port, "head")
    assert reply == proto.NBD_REP_ERR_UNKNOWN
    assert b"access key" in message and KEY.encode() not in message
    assert after == b""

    # The data did not change; the key opens every kind of export.
    assert read_all(keyed(base, "head"), tmp_path) == before
    # The control API answers only with the key too.
    assert r.api("GET", "/v1/info").status_code == 401
    assert r.api("POST", "/v1/snapshots", json={"name": "s0"}).status_code == 401
    assert r.api("GET", "/v1/info", headers={"Authorization": f"Bearer {new_key()}"}
                 ).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    r.ok("POST", "/v1/snapshots", json={"name": "s1"}, headers=auth)
    assert nbdinfo_json(keyed(base, "snapshot/s1"))["exports"][0]["export-size"] == 16 << 20
    layers = r.ok("GET", "/v1/layers", headers=auth)
    assert [la["name"] for la in layers if la["name"]] == ["s1"]  # s0 was never made
    layer = next(la["file"] for la in layers if la["name"] == "s1")
    assert nbdinfo_json(keyed(base, f"layer/{layer}"))["exports"][0]["is_read_only"]
    assert nbdinfo_json(r.unix_uri(keyed_export(KEY, "head")))["exports"][0]["export-size"]
    # The key is never told back: not in the replica's info.
    assert KEY not in r.api("GET", "/v1/info", headers=auth).text
    # `drove replica` finds the key where the agent puts it.
    out = run(drove_cmd("replica", "info", "--url", r.control, "--json")).stdout
    assert json.loads(out)["size"] == 16 << 20


def test_a_replica_without_a_key_ignores_a_key_prefix(replicas) -> None:
    r = replicas("r1", "8M")
    base = f"nbd://{r.addresses['nbd_host']}:{r.addresses['nbd_port']}/"
    qemu_io(keyed(base, "head"), PATTERN)
    qemu_io(base + "head", "read -P 0x5a 1M 1M")


def test_engine_with_the_key_writes_and_rebuilds_an_engine_without_is_refused(
        cluster, keyed_env, monkeypatch) -> None:
    eng = cluster.start(2, "32M")
    qemu_io(eng.uri(), PATTERN)
    eng.ok("POST", "/v1/snapshots", json={"name": "base"})
    qemu_io(eng.uri(), "write -P 0x33 8M 2M")
    # A rebuild: the new replica pulls the layers from a source with the key.
    fresh = cluster.replica("r2", "32M")
    eng.ok("POST", "/v1/replicas", json={"name": "r2", "url": fresh.control})
    rb = eng.wait_rebuilt()
    assert rb["bytes_done"] == rb["bytes_total"] > 0
    eng.wait_for(lambda i: i["health"] == "healthy", what="healthy")
    for r in (*cluster.replicas, fresh):
        base = f"nbd://{r.addresses['nbd_host']}:{r.addresses['nbd_port']}/"
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", eng.uri(), keyed(base, "head")])
    # The engine's API shows no key.
    assert KEY not in eng.api("GET", "/v1/info").text
    sync = fresh.ok("GET", "/v1/rebuild/sync", headers={"Authorization": f"Bearer {KEY}"})
    assert sync["state"] == "done" and "key=***/" in sync["source"] and KEY not in str(sync)

    # A replica lost: the engine says why, without the key its connection named.
    fresh.kill()
    qemu_io(eng.uri(), "write -P 0x44 0 64k")
    info = eng.wait_for(lambda i: {r["name"]: r["mode"] for r in i["replicas"]}["r2"] == "ERR",
                        what="r2 dropped")
    (r2,) = [r for r in info["replicas"] if r["name"] == "r2"]
    assert "key=***/" in r2["error"] and KEY not in eng.api("GET", "/v1/info").text

    # An engine started without the key reaches no replica.
    eng.stop()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RuntimeError, match=r"401.*\n.*no replica is reachable"):
        cluster.start_engine("--epoch", "100")
