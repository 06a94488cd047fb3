"""Encrypted volumes through a real `drove serve --kek-file`: nbdsh writes, no plaintext stored.

A known pattern is written through the engine with nbdsh; every file under the
manager's data directory (replica layers of every snapshot, metadata, records)
and every backup block (decompressed) is then searched for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drove.backup import blocks
from managertools import ManagerProc
from nbdtools import run

pytestmark = pytest.mark.slow

MiB = 1 << 20
# Built, not written out, so the marker is in no file but where the volume puts it.
MARK = ("drove-" + "plaintext-marker:").encode()
assert len(MARK) < 128
PATTERN = (MARK + b"0123456789abcdef" * 8)[:128] * 32  # 4 KiB


def nbdsh(uri: str, code: str) -> str:
    """Run ``code`` in nbdsh connected to ``uri``; its stdout."""
    return run(["nbdsh", "-u", uri, "-c", code], timeout=120).stdout


def nbd_write(uri: str, offset: int, data: bytes, repeat: int = 1) -> None:
    """Write ``data`` ``repeat`` times from ``offset`` with nbdsh (libnbd)."""
    nbdsh(uri, f"buf = bytes.fromhex('{data.hex()}') * {repeat}\n"
               f"h.pwrite(buf, {offset})\nh.flush()")


def nbd_read(uri: str, offset: int, length: int) -> bytes:
    """Read a range with nbdsh (libnbd)."""
    return bytes.fromhex(nbdsh(uri, f"print(h.pread({length}, {offset}).hex())").strip())


def files_holding(root: Path, needle: bytes) -> list[Path]:
    """Every regular file under ``root`` containing ``needle``."""
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    found.append(p)
            except OSError:
                continue
    return found


def backup_blocks_holding(root: Path, needle: bytes) -> tuple[int, list[Path]]:
    """(blocks looked at, those whose decompressed data holds ``needle``) on a file target."""
    seen, found = 0, []
    for p in (root / "blocks").rglob("*.blk"):
        seen += 1
        if needle in blocks.decode(p.read_bytes(), p.stem):
            found.append(p)
    return seen, found


def restart(m: ManagerProc, kek: Path | None) -> None:
    """Stop the manager cleanly and start it again with ``kek`` (None: no --kek-file)."""
    m.stop()
    m.start(extra=("--kek-file", str(kek)) if kek else ())


@pytest.fixture
def kek_manager(tmp_path):
    """A `drove serve --kek-file KEK` (KEK: a random 256-bit key in hex)."""
    kek = tmp_path / "kek"
    kek.write_text(os.urandom(32).hex())
    kek.chmod(0o600)
    m = ManagerProc(tmp_path / "data", tmp_path / "manager.log", root=tmp_path)
    try:
        yield m.start(extra=("--kek-file", str(kek))), kek
    finally:
        m.kill_everything()


def test_no_plaintext_stored_and_every_copy_reads_right(kek_manager, tmp_path):
    m, _ = kek_manager
    m.cli("disk", "add", str(tmp_path / "d2"))
    v = m.cli_json("volume", "create", "sec", "--size", "64M", "--replicas", "2",
                   "--encrypted")
    assert v["encryption"]["cipher"] == "aes-xts-plain64-4k", v
    key_id = v["encryption"]["key_id"]
    uri = m.cli_json("volume", "attach", "sec")["nbd_uri"]
    eng = m.volume("sec")["engine"]
    # The data key reached the engine in a file it read and the agent deleted: not in its
    # command line nor its environment.
    assert not list(Path(m.run_dir).glob("*.key"))
    cmdline = Path(f"/proc/{eng['pid']}/cmdline").read_bytes()
    assert b"--key-file" in cmdline

    nbd_write(uri, 0, PATTERN, 16)                 # 64 KiB at the start
    nbd_write(uri, 8 * MiB, PATTERN, 256)          # 1 MiB in the middle
    assert nbd_read(uri, 8 * MiB, 1 * MiB) == PATTERN * 256
    assert nbd_read(uri, 4 * MiB, 4096) == bytes(4096)  # never written: zeros
    # Zero and trim through the engine read as zeros, not as decrypted garbage.
    nbdsh(uri, f"h.zero(65536, {8 * MiB})\nh.trim(32768, 0)\nh.flush()")
    assert nbd_read(uri, 8 * MiB, 128 * 1024) == bytes(65536) + PATTERN * 16
    assert nbd_read(uri, 0, 65536) == bytes(32768) + PATTERN * 8

    m.cli("snapshot", "create", "sec", "s1")
    # A snapshot export would serve what a replica holds (ciphertext): refused, saying so.
    r = m.api("POST", "/v1/volumes/sec/snapshots/s1/export", json={})
    assert r.status_code == 409 and "clone the snapshot" in r.text, r.text
    nbd_write(uri, 16 * MiB, PATTERN, 64)          # in the head, after the snapshot
    assert files_holding(tmp_path / "data", MARK) == []
    assert files_holding(tmp_path / "d2", MARK) == []

    # Detach and attach: the same data comes back.
    m.cli("volume", "detach", "sec")
    uri = m.cli_json("volume", "attach", "sec")["nbd_uri"]
    assert nbd_read(uri, 8 * MiB + 65536, 64 * 1024) == PATTERN * 16
    assert nbd_read(uri, 16 * MiB, 4096) == PATTERN

    # A linked clone shares the key and reads right.
    clone = m.cli_json("volume", "clone", "sec", "cl", "--snapshot", "s1")
    assert clone["encryption"]["key_id"] == key_id
    curi = m.cli_json("volume", "attach", "cl")["nbd_uri"]
    assert nbd_read(curi, 8 * MiB + 65536, 64 * 1024) == PATTERN * 16
    assert nbd_read(curi, 16 * MiB, 4096) == bytes(4096)  # written after s1
    m.cli("volume", "detach", "cl")

    # A backup holds ciphertext only, names its key, and restores right.
    target = tmp_path / "backups"
    target.mkdir()
    m.cli("backup", "target", "set", f"file://{target}")
    b = m.cli_json("backup", "create", "sec")
    assert b["labels"]["drove.key-id"] == key_id, b
    seen, plain = backup_blocks_holding(target, MARK)
    assert seen > 0 and plain == []
    assert files_holding(target, MARK) == []
    # Neither an instant restore nor a DR standby of it yet: refused, nothing made.
    r = m.api("POST", f"/v1/backups/{b['name']}/restore",
              json={"volume": "inst", "instant": True})
    assert r.status_code == 422 and "encrypted" in r.text, r.text
    r = m.api("POST", "/v1/volumes", json={"name": "dr", "standby_of": "sec"})
    assert r.status_code == 422 and "encrypted" in r.text, r.text
    assert m.api("GET", "/v1/volumes/inst").status_code == 404
    assert m.api("GET", "/v1/volumes/dr").status_code == 404
    restored = m.cli_json("backup", "restore", b["name"], "--to", "back", "--replicas", "1")
    assert restored["volume"] == "back"
    assert m.volume("back")["encryption"]["key_id"] == key_id
    ruri = m.cli_json("volume", "attach", "back")["nbd_uri"]
    assert nbd_read(ruri, 16 * MiB, 4096) == PATTERN
    assert nbd_read(ruri, 0, 64 * 1024) == bytes(32768) + PATTERN * 8
    assert nbd_read(ruri, 8 * MiB, 1 * MiB) == bytes(65536) + PATTERN * 240
    m.cli("volume", "detach", "back")
    m.cli("volume", "detach", "sec")
    assert files_holding(tmp_path / "data", MARK) == []
    assert files_holding(tmp_path / "d2", MARK) == []


def test_wrong_or_missing_kek_refused_and_nothing_changed(kek_manager, tmp_path):
    m, kek = kek_manager
    other = tmp_path / "other-kek"
    other.write_text("a different passphrase\n")
    m.cli("volume", "create", "sec", "--size", "16M", "--replicas", "1", "--encrypted")
    uri = m.cli_json("volume", "attach", "sec")["nbd_uri"]
    nbd_write(uri, 16 * 4096, PATTERN, 4)
    m.cli("volume", "detach", "sec")

    # A wrong KEK, then none: refused with the reason, nothing started, nothing changed.
    before = m.volume("sec")
    restart(m, other)
    r = m.api("POST", "/v1/volumes/sec/attach", json={})
    assert r.status_code == 409 and "does not unwrap" in r.text, r.text
    after = m.volume("sec")
    assert after["state"] == "detached" and after["engine"] is None
    assert all(r["pid"] is None for r in after["replicas"]), after["replicas"]
    out = m.cli("volume", "attach", "sec", check=False)
    assert out.returncode != 0 and "--kek-file" in out.stderr + out.stdout
    restart(m, None)
    r = m.api("POST", "/v1/volumes/sec/attach", json={})
    assert r.status_code == 422 and "--kek-file" in r.text, r.text
    r = m.api("POST", "/v1/volumes", json={"name": "x", "size": MiB, "encrypted": True})
    assert r.status_code == 422 and "--kek-file" in r.text, r.text
    assert m.volume("sec")["encryption"] == before["encryption"]
    restart(m, kek)
    uri = m.cli_json("volume", "attach", "sec")["nbd_uri"]
    assert nbd_read(uri, 16 * 4096, 4 * 4096) == PATTERN * 4
    m.cli("volume", "detach", "sec")


def test_mounted_encrypted_volume(kek_manager, tmp_path):
    m, _ = kek_manager
    m.cli("volume", "create", "fs", "--size", "64M", "--replicas", "1", "--encrypted")
    mnt = tmp_path / "mnt"
    m.cli("volume", "attach", "fs", "--mount", str(mnt))
    text = (MARK * 1000)[:20000]
    (mnt / "f").write_bytes(text)
    os.sync()
    m.cli("volume", "detach", "fs")
    assert files_holding(tmp_path / "data", MARK) == []
    m.cli("volume", "attach", "fs", "--mount", str(mnt))
    assert (mnt / "f").read_bytes() == text
    m.cli("volume", "detach", "fs")
