"""Incremental export through `drove serve`: `drove snapshot diff` (attached and detached),
`drove snapshot export --since` copied with nbdcopy onto an image of FROM, qcow2 files whole
and as a delta over a qcow2 of FROM, and bad input refused with nothing changed."""

from __future__ import annotations

import shutil

import pytest

from exporttools import delta_copy, same_image
from replicatools import qemu_io, run

MiB = 1 << 20
# A zero over s1's data is data (real zeros); over nothing it is nothing.
S1_TO_S2 = [[0, 4096], [3 * MiB, 2 * MiB], [40 * MiB, 4096]]


@pytest.mark.slow
def test_diff_and_incremental_export(manager, tmp_path):
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "disk1")})
    manager.cli("volume", "create", "db", "--size", "64M", "--replicas", "2")
    uri = manager.cli_json("volume", "attach", "db")["nbd_uri"]
    qemu_io(uri, "write -P 1 0 2M", "write -P 2 40M 4k")
    manager.cli("snapshot", "create", "db", "s1")
    qemu_io(uri, "write -P 3 100 200", "write -P 4 3M 2M", "write -z 40M 8k")
    manager.cli("snapshot", "create", "db", "s2")
    qemu_io(uri, "write -P 5 60M 4k")

    d = manager.cli_json("snapshot", "diff", "db", "s1", "s2")
    assert d["extents"] == S1_TO_S2 and d["bytes"] == 2 * MiB + 8192
    assert (d["volume"], d["since"], d["to"], d["head"]) == ("db", "s1", "s2", False)
    head = manager.cli_json("snapshot", "diff", "db", "s1", "--to-head")
    assert head["head"] and head["extents"] == [*S1_TO_S2, [60 * MiB, 4096]]
    text = manager.cli("snapshot", "diff", "db", "s1", "s2").stdout
    assert "total" in text and "3 extents" in text and "3,145,728" in text

    # The delta export onto an image of s1 gives s2, reading about the delta only.
    s1 = tmp_path / "s1.img"
    s2 = tmp_path / "s2.img"
    for snap, img in (("s1", s1), ("s2", s2)):
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
             manager.cli_json("snapshot", "export", "db", snap)["nbd_uri"], str(img)])
    exp = manager.cli_json("snapshot", "export", "db", "s2", "--since", "s1")
    assert exp["since"] == "s1" and "@since=s1" in exp["nbd_uri"]
    human = manager.cli("snapshot", "export", "db", "s2", "--since", "s1")
    assert human.stdout.strip() == exp["nbd_uri"] and "nbdcopy" in human.stderr
    target = tmp_path / "target.img"
    shutil.copy(s1, target)
    assert delta_copy(exp["nbd_uri"], target, tmp_path / "stats.txt") == d["bytes"]
    assert same_image(target, s2)

    # qcow2: s1 whole, then s2 as a delta over it.
    q1 = tmp_path / "s1.qcow2"
    manager.cli("snapshot", "export", "db", "s1", "--format", "qcow2", "--output", str(q1))
    assert same_image(q1, s1, "qcow2")
    q2 = tmp_path / "out" / "s2.qcow2"
    q2.parent.mkdir()
    res = manager.cli_json("snapshot", "export", "db", "s2", "--since", "s1", "--format",
                           "qcow2", "--output", str(q2), "--backing", str(q1))
    assert res["output"] == str(q2)
    assert same_image(q2, s2, "qcow2")
    info = run(["qemu-img", "info", "--output=json", str(q2)]).stdout.decode()
    assert '"backing-filename": "../s1.qcow2"' in info
    assert q2.stat().st_size < 4 * MiB  # the delta, not the 2 MiB of s1 again plus s2's

    # Bad input: a clear message, nothing written, nothing changed.
    before = manager.ok("GET", "/v1/volumes/db/snapshots")
    for args, words in [
        (("diff", "db", "nope", "s2"), "nope"),
        (("diff", "db", "s2", "s1"), "swap"),
        (("diff", "db", "s1"), "--to-head"),
        (("export", "db", "s1", "--since", "s2"), "swap"),
        (("export", "db", "s2", "--since", "nope"), "nope"),
        (("export", "db", "s2", "--format", "qcow2"), "--output"),
        (("export", "db", "s2", "--since", "s1", "--format", "qcow2", "-o",
          str(tmp_path / "x.qcow2")), "--backing"),
        (("export", "db", "s2", "--format", "qcow2", "-o", str(q1)), "exists"),
        (("export", "db", "s2", "--format", "vmdk", "-o", str(tmp_path / "y")), "vmdk"),
    ]:
        r = manager.cli("snapshot", *args, check=False)
        assert r.returncode != 0 and words in r.stdout + r.stderr, (args, r.stdout, r.stderr)
    assert not (tmp_path / "x.qcow2").exists() and not (tmp_path / "y").exists()
    assert manager.api("GET", "/v1/volumes/db/diff", params={"since": "s2", "to": "s1"}
                       ).status_code == 400
    assert manager.api("GET", "/v1/volumes/db/diff", params={"since": "zz"}).status_code == 404
    assert manager.api("POST", "/v1/volumes/db/snapshots/s2/export",
                       json={"since": "s1", "bogus": 1}).status_code == 422
    assert manager.ok("GET", "/v1/volumes/db/snapshots") == before

    # Detached: the diff is read from a replica's files.
    manager.cli("volume", "detach", "db")
    assert manager.cli_json("snapshot", "diff", "db", "s1", "s2")["extents"] == S1_TO_S2
    assert manager.cli_json("snapshot", "diff", "db", "s1", "--to-head")["extents"] \
        == head["extents"]
