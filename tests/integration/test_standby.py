"""DR standby volumes through a real `drove serve` and a real directory backup target.

The source volume is written with qemu-io over NBD and backed up with the CLI; the
standby follows its backups by itself; its data is checked with `qemu-img compare`
(after activation over its own export; before, on its replica's only layer file, since
a standby cannot be attached).
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from backuptools import wait_for

pytestmark = pytest.mark.slow

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 2 * MiB


def qemu_io(uri: str, *commands: str) -> None:
    """Run qemu-io commands against an NBD URI."""
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, uri], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def compare(a: str, b: str) -> None:
    """qemu-img compare of two raw images (NBD URIs or files): identical contents."""
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def set_target(manager, tmp_path: Path) -> Path:
    """A directory backup target; its root."""
    root = tmp_path / "backups"
    root.mkdir()
    manager.cli("backup", "target", "set", f"file://{root}")
    return root


def backup(manager, volume: str) -> str:
    """`drove backup create VOLUME`: the new backup's name."""
    return manager.cli_json("backup", "create", volume)["name"]


def wait_restored(manager, name: str, backup_name: str, timeout: float = 45) -> dict[str, Any]:
    """The standby once it holds ``backup_name`` completely."""
    return manager.wait_volume(
        name, lambda v: (v.get("standby") or {}).get("backup") == backup_name
        and not v["standby"]["applying"], timeout=timeout,
        what=f"standby {name} to restore {backup_name}")


def wait_event(manager, volume: str, kind: str, text: str, timeout: float = 45) -> dict:
    """The first event of ``kind`` about ``volume`` whose message holds ``text``."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in manager.events(volume)
                 if e["kind"] == kind and text in e["message"]]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {kind} event with {text!r}: " \
            f"{[e['message'] for e in manager.events(volume)][-10:]}"
        time.sleep(0.2)


def only_layer(volume: dict[str, Any]) -> str:
    """The path of the one layer file of a volume's only replica (its whole data)."""
    [rep] = volume["replicas"]
    files = sorted(Path(rep["path"]).glob("*.img"))
    assert len(files) == 1, files
    return str(files[0])


def writing_or_done(manager, backup_name: str) -> str | None:
    """"writing" once the standby's restore of ``backup_name`` writes its blocks, "done"
    once that restore ended, else None."""
    for t in manager.ok("GET", "/v1/tasks"):
        if t["kind"] == "standby-restore" and t["backup"] == backup_name:
            if t["state"] != "running":
                return "done"
            if (t["message"] or "").startswith("writing"):
                return "writing"
    return None


def refused(r, name: str) -> None:
    """A 409 telling to activate standby ``name`` first."""
    assert r.status_code == 409, r.text
    assert f"drove volume activate {name}" in r.json()["detail"], r.text


def test_standby_follows_incrementally_survives_restart_and_activates(manager, tmp_path):
    set_target(manager, tmp_path)
    manager.cli("volume", "create", "src", "--size", "32M", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "src")["nbd_uri"]
    # Blocks 0, 3 and 6 hold data.
    qemu_io(uri, f"write -P 1 0 {BLOCK}", f"write -P 2 {6 * MiB} {MiB}",
            f"write -P 3 {12 * MiB} {BLOCK}")
    b1 = backup(manager, "src")

    created = manager.cli_json("volume", "create", "dr", "--standby-of", "src",
                               "--replicas", "1")
    assert created["size"] == 32 * MiB and created["standby"]["of"] == "src"
    v = wait_restored(manager, "dr", b1)
    first = v["standby"]["last_restore"]
    assert (first["blocks_written"], first["bytes_written"]) == (3, 2 * BLOCK + MiB), first
    assert v["standby"]["lag_seconds"] >= 0 and v["state"] == "detached"
    shown = manager.cli("volume", "get", "dr").stdout
    assert "standby of" in shown and b1 in shown and "lag" in shown
    assert "standby of src" in manager.cli("volume", "list").stdout

    # Nothing may write it but its restores.
    refused(manager.api("POST", "/v1/volumes/dr/attach", json={}), "dr")
    refused(manager.api("POST", "/v1/volumes/dr/snapshots", json={}), "dr")
    refused(manager.api("POST", "/v1/volumes/dr/backups", json={}), "dr")
    refused(manager.api("POST", f"/v1/backups/{b1}/restore", json={"volume": "dr"}), "dr")
    refused(manager.api("POST", "/v1/volumes/dr/clone", json={"name": "c"}), "dr")
    refused(manager.api("POST", "/v1/volumes/dr/expand", json={"size": "64M"}), "dr")
    r = manager.cli("volume", "attach", "dr", check=False)
    assert r.returncode != 0 and "drove volume activate dr" in r.stdout + r.stderr

    # Block 3 changes, block 10 is new, block 6 becomes empty.
    qemu_io(uri, f"write -P 4 {7 * MiB} {MiB}", f"write -P 5 {20 * MiB} {512 * KiB}",
            f"write -z {12 * MiB} {BLOCK}")
    b2 = backup(manager, "src")
    v = wait_restored(manager, "dr", b2)
    last = v["standby"]["last_restore"]
    # Only the two changed blocks are written (block 3 whole: both its MiB hold data).
    assert (last["blocks_written"], last["blocks_zeroed"], last["full"]) == (2, 1, False), last
    assert last["bytes_written"] == BLOCK + 512 * KiB, last
    wait_event(manager, "dr", "standby-restored", f"{b2} of volume src incrementally")
    assert any(t["kind"] == "standby-restore" and t["backup"] == b2
               and t["state"] == "succeeded" for t in manager.ok("GET", "/v1/tasks"))
    compare(only_layer(v), uri)

    # The follower's state is in the record: a restarted manager follows on.
    manager.stop()
    manager.start()
    uri = manager.wait_volume("src", lambda s: s["state"] == "attached")["nbd_uri"]
    # The source grows: so does the standby (block 18 is past its old end).
    manager.cli("volume", "expand", "src", "--size", "40M")
    qemu_io(uri, f"write -P 6 {30 * MiB} {MiB}", f"write -P 7 {36 * MiB} {MiB}")
    b3 = backup(manager, "src")
    v = wait_restored(manager, "dr", b3)
    assert v["size"] == 40 * MiB
    assert v["standby"]["last_restore"]["blocks_written"] == 2

    active = manager.cli_json("volume", "activate", "dr")
    assert active["standby"] is None and active["labels"]["drove.restored-from"] == b3
    wait_event(manager, "dr", "standby-activated", b3)
    attached = manager.cli_json("volume", "attach", "dr")
    compare(attached["nbd_uri"], uri)
    # An ordinary volume now: it snapshots and backs up.
    manager.cli("snapshot", "create", "dr", "after")
    manager.cli("volume", "detach", "dr")
    manager.cli("volume", "detach", "src")


def test_bad_block_keeps_the_last_complete_backup_until_a_good_one(manager, tmp_path):
    root = set_target(manager, tmp_path)
    manager.cli("volume", "create", "src", "--size", "16M", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "src")["nbd_uri"]
    qemu_io(uri, f"write -P 1 0 {BLOCK}", f"write -P 2 {4 * MiB} {BLOCK}")
    b1 = backup(manager, "src")
    manager.cli("volume", "create", "dr", "--standby-of", "src")
    v = wait_restored(manager, "dr", b1)

    # Blocks are named by their hash: a corrupt copy of block 2's next contents, stored
    # before the backup, is what the backup refers to (it is "already there").
    digest = hashlib.sha256(bytes([9]) * BLOCK).hexdigest()
    bad = root / "blocks" / digest[:2] / digest[2:4] / f"{digest}.blk"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not a block")
    qemu_io(uri, f"write -P 9 {4 * MiB} {BLOCK}", f"write -P 3 {10 * MiB} {MiB}")
    b2 = backup(manager, "src")
    failed = wait_event(manager, "dr", "standby-restore-failed", digest[:12])
    assert b2 in failed["message"] and f"stays on backup {b1}" in failed["message"]
    v = manager.volume("dr")
    assert v["standby"]["backup"] == b1 and v["standby"]["applying"] is None
    assert v["standby"]["behind"] and digest[:12] in v["standby"]["error"]
    snap = manager.cli_json("snapshot", "export", "src", b1)["nbd_uri"]
    compare(only_layer(v), snap)  # nothing of b2 got in, not even its good block
    # Activation checks the target again: refused while the newest backup is bad.
    r = manager.api("POST", "/v1/volumes/dr/activate", json={})
    assert r.status_code == 409 and digest[:12] in r.json()["detail"], r.text
    assert "activate dr --force" in r.json()["detail"]
    assert manager.volume("dr")["standby"]["backup"] == b1

    # A good third backup (block 2 rewritten): the standby catches up to it.
    qemu_io(uri, f"write -P 10 {4 * MiB} {BLOCK}")
    b3 = backup(manager, "src")
    v = wait_restored(manager, "dr", b3)
    assert v["standby"]["error"] is None
    assert v["standby"]["last_restore"]["blocks_written"] == 2  # blocks 2 and 5, since b1
    manager.cli("volume", "activate", "dr")
    compare(manager.cli_json("volume", "attach", "dr")["nbd_uri"], uri)
    manager.cli("volume", "detach", "dr")
    manager.cli("volume", "detach", "src")


def test_bad_input_and_a_source_that_is_not_here(manager, tmp_path):
    set_target(manager, tmp_path)
    r = manager.api("POST", "/v1/volumes", json={"name": "dr", "standby_of": "nosuch"})
    assert r.status_code == 404 and "no backup of volume nosuch" in r.json()["detail"]
    r = manager.api("POST", "/v1/volumes", json={"name": "dr", "standby_of": "Bad/Name"})
    assert r.status_code == 422, r.text
    r = manager.api("POST", "/v1/volumes", json={"name": "dr"})
    assert r.status_code == 422 and "size is required" in r.json()["detail"]
    r = manager.api("POST", "/v1/volumes/nosuch/activate", json={})
    assert r.status_code == 404

    # The source is backed up, then deleted here: its backups are all a standby needs.
    manager.cli("volume", "create", "src", "--size", "8M", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "src")["nbd_uri"]
    qemu_io(uri, f"write -P 7 {MiB} {3 * MiB}")
    b1 = backup(manager, "src")
    expected = tmp_path / "expected.img"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(expected)],
                   check=True, timeout=60)
    manager.cli("volume", "detach", "src")
    manager.cli("volume", "delete", "src")

    r = manager.api("POST", "/v1/volumes", json={"name": "dr", "standby_of": "src",
                                                 "size": "8M"})
    assert r.status_code == 422 and "not both" in r.json()["detail"]
    r = manager.cli("volume", "create", "dr", "--standby-of", "src", "--size", "8M",
                    check=False)
    assert r.returncode != 0 and "not both" in r.stdout + r.stderr
    manager.cli("volume", "create", "taken", "--size", "4M", "--replicas", "1")
    r = manager.api("POST", "/v1/volumes", json={"name": "taken", "standby_of": "src"})
    assert r.status_code == 409 and "exists" in r.json()["detail"]
    assert manager.volume("taken")["standby"] is None
    assert {v["name"] for v in manager.ok("GET", "/v1/volumes")} == {"taken"}

    r = manager.api("POST", "/v1/volumes/taken/activate", json={})
    assert r.status_code == 409 and "not a DR standby" in r.json()["detail"]
    # No --replicas: the backed-up volume's count (1), recorded in the backup.
    v = manager.cli_json("volume", "create", "dr", "--standby-of", "src")
    assert v["replica_count"] == 1 and v["size"] == 8 * MiB
    v = wait_restored(manager, "dr", b1)
    compare(only_layer(v), str(expected))
    assert (manager.data_dir / "standby" / "dr" / "restored.json").exists()
    manager.cli("volume", "delete", "dr")
    # The follower forgets a deleted standby's staging area.
    wait_for(lambda: not (manager.data_dir / "standby" / "dr").exists(), timeout=20,
             what="the staging area of the deleted standby to go")


@pytest.mark.parametrize("staging", ["kept", "lost"])
def test_manager_killed_during_a_restore(manager, tmp_path, staging):
    set_target(manager, tmp_path)
    manager.cli("volume", "create", "src", "--size", "48M", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "src")["nbd_uri"]
    qemu_io(uri, *(f"write -P {i + 1} {i * BLOCK} {BLOCK}" for i in range(0, 24, 2)))
    b1 = backup(manager, "src")
    manager.cli("volume", "create", "dr", "--standby-of", "src")
    wait_restored(manager, "dr", b1)
    # SIGKILL the manager once the next backup is staged and its blocks are being
    # written: the next manager finishes it from the staging area, or, when that is lost
    # (another manager leads now, say), rewrites the volume whole from the target.  A
    # restore may end between two looks at its task: then again with another backup.
    area = manager.data_dir / "standby" / "dr"
    for attempt in range(3):
        # Every block changes (distinct contents: no two share a stored block).
        qemu_io(uri, *(f"write -P {i + 100 + 30 * attempt} {i * BLOCK} {BLOCK}"
                       for i in range(24)))
        b2 = backup(manager, "src")
        wait_for(lambda b=b2: writing_or_done(manager, b), timeout=30,
                 what=f"the standby's restore of {b2} to write")
        manager.stop(signal.SIGKILL)
        if (area / "staged.json").exists():
            break
        manager.start()
        uri = manager.wait_volume("src", lambda s: s["state"] == "attached")["nbd_uri"]
    else:
        pytest.fail("the manager was never killed while a standby's blocks were written")
    if staging == "lost":
        shutil.rmtree(area)
    manager.start()
    v = wait_restored(manager, "dr", b2)
    last = v["standby"]["last_restore"]
    assert (last["blocks_written"], last["resumed"]) == (24, True), last
    assert last["full"] == (staging == "lost"), last
    snap = manager.cli_json("snapshot", "export", "src", b2)["nbd_uri"]
    compare(only_layer(v), snap)
    manager.cli("volume", "activate", "dr")
    compare(manager.cli_json("volume", "attach", "dr")["nbd_uri"], snap)
    manager.cli("volume", "detach", "dr")
    manager.cli("volume", "detach", "src")
