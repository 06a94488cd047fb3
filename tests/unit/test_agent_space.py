"""The agent's side of space honesty: which filesystem is mounted where, fstrim's refusals,
and the space report of a replica directory no process serves."""

from __future__ import annotations

import pytest

from drove.agent.hostattach import HostAttachError
from drove.agent.space import mounted_source, replica_space, trim_host
from drove.replica import Replica


def test_mounted_source_reads_mountinfo(tmp_path):
    assert mounted_source("/") is not None  # the root filesystem's source
    assert mounted_source(str(tmp_path)) is None  # a plain directory mounts nothing


def test_trim_refuses_what_drove_did_not_mount(tmp_path):
    with pytest.raises(HostAttachError, match="--mount"):
        trim_host({"mountpoint": None, "device": "/dev/loop0"})
    with pytest.raises(HostAttachError, match="nothing is mounted"):
        trim_host({"mountpoint": str(tmp_path), "device": "/dev/loop0"})
    # Something else mounted there now: never trimmed in the volume's name.
    with pytest.raises(HostAttachError, match="not the volume's device"):
        trim_host({"mountpoint": "/", "device": "/dev/drove-no-such-device"})


def test_replica_space_of_a_detached_replica(tmp_path):
    d = tmp_path / "replicas" / "v-r1"
    with Replica.create(d, 1 << 20) as r:
        r.write(0, b"x" * 8192)
        r.snapshot("s1")
        r.write(4096, b"y" * 4096)
    rep = replica_space(str(d))
    assert rep["head"] == 4096 and rep["actual"] >= 12288 and rep["shared"] == 0
    (s1,) = [la for la in rep["layers"] if la["name"] == "s1"]
    assert s1["data"] == 8192 and s1["freed_by_delete"] == 4096  # what the head overwrote
    with pytest.raises(ValueError, match="not a replica directory"):
        replica_space(str(tmp_path))
    with Replica.open(d), pytest.raises(ValueError, match="cannot be read here"):
        replica_space(str(d))  # a process holds it: ask its control API
