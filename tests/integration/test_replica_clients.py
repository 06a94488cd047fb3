"""A replica process driven by real NBD clients and its control API."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

from replicatools import drove_cmd, nbdinfo_json, nbdsh, qemu_io, run

MiB = 1 << 20


def write_random_image(path: Path, size: int, seed: int, density: float = 0.5) -> bytes:
    """A raw image with random 64 KiB chunks of data and holes; returns its bytes."""
    rnd = random.Random(seed)
    data = bytearray(size)
    for off in range(0, size, 64 * 1024):
        if rnd.random() < density:
            data[off:off + 64 * 1024] = rnd.randbytes(64 * 1024)
    path.write_bytes(data)
    return bytes(data)


def test_nbdinfo_flags_and_list(replicas):
    r = replicas("r1", "64M")
    info = nbdinfo_json(r.uri("head"))["exports"][0]
    assert info["export-size"] == 64 * MiB
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_multi_conn", "can_cache", "can_df"):
        assert info[flag] is True, flag
    assert info["is_read_only"] is False
    assert "base:allocation" in info["contexts"]

    r.ok("POST", "/v1/snapshots", json={"name": "s1"})
    names = {e["export-name"] for e in nbdinfo_json(r.uri(), "--list")["exports"]}
    assert {"head", "snapshot/s1"} <= names
    snap = nbdinfo_json(r.uri("snapshot/s1"))["exports"][0]
    assert snap["is_read_only"] is True
    assert snap["export-size"] == 64 * MiB


def test_map_matches_written_extents(replicas):
    r = replicas("r1", "16M")
    # Write 3 separate 64 KiB regions, one in a snapshot layer and two in the head.
    nbdsh(r.uri(), "h.pwrite(b'a' * 65536, 1048576)")
    r.ok("POST", "/v1/snapshots", json={"name": "base"})
    nbdsh(r.uri(), "h.pwrite(b'b' * 65536, 4194304); h.pwrite(b'c' * 131072, 8388608)")
    extents = nbdinfo_json(r.uri(), "--map")
    data = [(e["offset"], e["length"]) for e in extents if e["type"] & 1 == 0]
    assert data == [(1048576, 65536), (4194304, 65536), (8388608, 131072)]
    snap = nbdinfo_json(r.uri("snapshot/base"), "--map")
    assert [(e["offset"], e["length"]) for e in snap if e["type"] & 1 == 0] == [(1048576, 65536)]


def test_qemu_img_snapshot_export_equals_image(replicas, tmp_path):
    size = 32 * MiB
    r = replicas("r1", size)
    img1 = tmp_path / "one.raw"
    write_random_image(img1, size, seed=1)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img1), r.uri()])
    r.ok("POST", "/v1/snapshots", json={"name": "one", "labels": {"k": "v"}})
    img2 = tmp_path / "two.raw"
    write_random_image(img2, size, seed=2, density=0.3)
    # A full convert over the old data: holes in img2 must become zeros in the head.
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img2), r.uri()])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img1), r.uri("snapshot/one")])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img2), r.uri("head")])
    layers = r.ok("GET", "/v1/layers")
    snap = next(layer for layer in layers if layer["name"] == "one")
    assert snap["labels"] == {"k": "v"}


def test_qemu_io_unaligned(replicas):
    r = replicas("r1", "8M")
    qemu_io(r.uri(), "write -P 0x11 0 1M")
    r.ok("POST", "/v1/snapshots", json={"name": "s"})
    # Unaligned writes over snapshot data force read-modify-write of edge blocks.
    qemu_io(r.uri(), "write -P 0x22 1000 3000", "write -P 0x33 8190 5",
            "write -P 0x44 1048570 20",
            "read -P 0x11 0 1000", "read -P 0x22 1000 3000", "read -P 0x11 4000 4190",
            "read -P 0x33 8190 5", "read -P 0x11 8195 1040375",
            "read -P 0x44 1048570 20", "read -P 0x00 1048590 1000")
    qemu_io(r.uri("snapshot/s"), "read -P 0x11 0 1048576", read_only=True)


def test_fio_verify_pipelined(replicas, tmp_path):
    r = replicas("r1", "64M")
    r.ok("POST", "/v1/snapshots", json={"name": "empty"})
    job = [
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={r.unix_uri()}",
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M", "--offset=0",
        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=0",
        "--verify_state_save=0",
        "--output-format=json",
    ]
    out = run(job, timeout=300)
    text = out.stdout.decode()
    result = json.loads(text[text.index("{"):])["jobs"][0]
    assert result["error"] == 0
    assert result["write"]["io_bytes"] == 32 * MiB


def test_nbdcopy_multi_conn_roundtrip(replicas, tmp_path):
    size = 32 * MiB
    r = replicas("r1", size)
    src = tmp_path / "src.raw"
    expected = write_random_image(src, size, seed=3)
    run(["nbdcopy", "--connections=4", "--requests=16", str(src), r.uri()])
    dst = tmp_path / "dst.raw"
    run(["nbdcopy", "--connections=4", r.uri(), str(dst)])
    assert dst.read_bytes() == expected


def test_snapshot_export_refuses_writes(replicas):
    r = replicas("r1", "4M")
    nbdsh(r.uri(), "h.pwrite(b'x' * 4096, 0)")
    r.ok("POST", "/v1/snapshots", json={"name": "s"})
    script = (
        "import errno\n"
        "assert h.is_read_only()\n"
        "try:\n"
        "    h.pwrite(b'y' * 4096, 0)\n"
        "    raise SystemExit('write to a snapshot succeeded')\n"
        "except nbd.Error as e:\n"
        "    assert e.errnum == errno.EPERM, e\n"
        "assert h.pread(4096, 0) == b'x' * 4096\n"
    )
    nbdsh(r.uri("snapshot/s"), script)


def test_control_api_rejects_bad_input(replicas):
    r = replicas("r1", "4M")
    nbdsh(r.uri(), "h.pwrite(b'q' * 4096, 0)")
    assert r.api("POST", "/v1/snapshots", json={"name": "../evil"}).status_code == 400
    assert r.api("POST", "/v1/snapshots", json={"name": ""}).status_code == 400
    assert r.api("POST", "/v1/snapshots", json={"nom": "x"}).status_code == 422
    r.ok("POST", "/v1/snapshots", json={"name": "a"})
    dup = r.api("POST", "/v1/snapshots", json={"name": "a"})
    assert dup.status_code in (400, 409), dup.text
    assert "a" in dup.json()["detail"]
    assert r.api("POST", "/v1/revert", json={"snapshot": "nope"}).status_code == 404
    assert r.api("DELETE", "/v1/snapshots/nope").status_code == 404
    shrink = r.api("POST", "/v1/expand", json={"size": 1 << 20})
    assert shrink.status_code == 400 and "shrink" in shrink.text.lower()
    # Nothing above changed the data or the chain.
    assert len([x for x in r.ok("GET", "/v1/layers") if x["name"]]) == 1
    nbdsh(r.uri(), "assert h.pread(4096, 0) == b'q' * 4096")


def test_revert_expand_delete_through_api(replicas):
    r = replicas("r1", "4M")
    nbdsh(r.uri(), "h.pwrite(b'1' * 8192, 0)")
    r.ok("POST", "/v1/snapshots", json={"name": "one"})
    nbdsh(r.uri(), "h.pwrite(b'2' * 8192, 0)")
    r.ok("POST", "/v1/snapshots", json={"name": "two"})
    nbdsh(r.uri(), "h.pwrite(b'3' * 4096, 0)")
    r.ok("POST", "/v1/revert", json={"snapshot": "one"})
    nbdsh(r.uri(), "assert h.pread(8192, 0) == b'1' * 8192")
    nbdsh(r.uri("snapshot/two"), "assert h.pread(8192, 0) == b'2' * 8192")
    info = r.ok("POST", "/v1/expand", json={"size": 8 << 20})
    assert info["size"] == 8 << 20
    nbdsh(r.uri(), "assert h.get_size() == 8 << 20; h.pwrite(b'e' * 4096, 7 << 20)")
    r.ok("DELETE", "/v1/snapshots/two")
    names = [x["name"] for x in r.ok("GET", "/v1/layers")]
    assert "two" not in names and "one" in names
    nbdsh(r.uri(), "assert h.pread(8192, 0) == b'1' * 8192")
    sum1 = r.ok("GET", "/v1/snapshots/one/checksum")["checksum"]
    assert sum1 == r.ok("GET", "/v1/snapshots/one/checksum")["checksum"]
    assert len(sum1) == 64


def test_second_process_on_same_dir_is_refused(replicas, tmp_path):
    r = replicas("r1", "4M")
    res = subprocess.run(
        drove_cmd("replica", "serve", str(r.dir), "--nbd", "127.0.0.1:0",
                  "--control", "127.0.0.1:0"),
        capture_output=True, timeout=60,
    )
    assert res.returncode != 0
    err = res.stderr.decode()
    assert str(r.proc.pid) in err, err
    nbdsh(r.uri(), "h.pwrite(b'z' * 512, 0)")


def test_serve_without_size_on_empty_dir_says_what_to_do(tmp_path):
    res = subprocess.run(
        drove_cmd("replica", "serve", str(tmp_path / "nothing"), "--nbd", "127.0.0.1:0",
                  "--control", "127.0.0.1:0"),
        capture_output=True, timeout=60,
    )
    assert res.returncode == 1
    assert b"--size" in res.stderr
    assert not (tmp_path / "nothing").exists()


def test_reopen_after_clean_stop_keeps_data(replicas, tmp_path):
    r = replicas("r1", "4M")
    nbdsh(r.uri(), "h.pwrite(b'k' * 4096, 4096)")
    r.ok("POST", "/v1/snapshots", json={"name": "s"})
    assert r.stop() == 0
    r2 = replicas("r1", None)
    nbdsh(r2.uri(), "assert h.pread(4096, 4096) == b'k' * 4096")
    assert os.path.exists(r2.dir / "volume.meta")


def test_cli_operates_a_running_replica(replicas):
    r = replicas("r1", "4M")
    url = ["--url", r.control]
    run(drove_cmd("replica", "snapshot", *url, "nightly", "--label", "app=db"))
    layers = json.loads(run(drove_cmd("replica", "layers", *url, "--json")).stdout)
    snap = next(x for x in layers if x["name"] == "nightly")
    assert snap["labels"] == {"app": "db"}
    info = json.loads(run(drove_cmd("replica", "info", *url, "--json")).stdout)
    assert info["size"] == 4 << 20 and info["snapshots"] == 1
    out = run(drove_cmd("replica", "checksum", *url, "nightly")).stdout.decode()
    assert out.split()[1] == "nightly" and len(out.split()[0]) == 64
    # Errors name the problem and exit non-zero; nothing changes.
    bad = run(drove_cmd("replica", "snapshot", *url, "nightly"), check=False)
    assert bad.returncode == 1 and b"nightly" in bad.stderr and b"409" in bad.stderr
    bad = run(drove_cmd("replica", "expand", *url, "lots"), check=False)
    assert bad.returncode == 1 and b"not a size" in bad.stderr
    gone = run(drove_cmd("replica", "info", "--url", "http://127.0.0.1:1"), check=False)
    assert gone.returncode == 1 and b"drove replica serve" in gone.stderr
    run(drove_cmd("replica", "delete", *url, "nightly"))
    info = json.loads(run(drove_cmd("replica", "info", *url, "--json")).stdout)
    assert info["snapshots"] == 0


def test_tls_required_replica(replicas, tmp_path):
    from nbdtools import make_tls_dir

    certs = make_tls_dir(tmp_path / "tls")
    r = replicas("r1", "4M", "--tls-cert", str(certs / "server-cert.pem"),
                 "--tls-key", str(certs / "server-key.pem"), "--tls-ca", str(certs / "ca-cert.pem"),
                 "--tls-required", unix=False)
    host, port = r.addresses["nbd_host"], r.addresses["nbd_port"]
    secure = f"nbds://{host}:{port}/head?tls-certificates={certs}"
    nbdsh(secure, "h.pwrite(b't' * 4096, 0); h.flush()")
    info = nbdinfo_json(secure)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 << 20
    plain = run(["nbdinfo", r.uri("head")], check=False)
    assert plain.returncode != 0
    other = make_tls_dir(tmp_path / "other-ca")
    forged = run(["nbdinfo", f"nbds://{host}:{port}/head?tls-certificates={other}"], check=False)
    assert forged.returncode != 0
    nbdsh(secure, "assert h.pread(4096, 0) == b't' * 4096")
