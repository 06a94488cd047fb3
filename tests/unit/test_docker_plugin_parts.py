"""The Docker plugin's option checking and its mount state file."""

from __future__ import annotations

import json
import os

import pytest

from drove.plugins import dockeropts
from drove.plugins.dockeropts import CreateOptions, OptionsError, parse
from drove.plugins.mountstate import MountState


def test_good_options_are_parsed():
    o = parse({"size": "10G", "replicas": "3", "pool": "ssd", "fs": "xfs", "preempt": "true"})
    assert o == CreateOptions(size=10 << 30, replicas=3, pool="ssd", fs="xfs", preempt=True)
    assert o.labels() == {"fs": "xfs", "preempt": "true"}
    assert parse({"from-snapshot": "db@nightly", "replicas": "2"}).snapshot == ("db", "nightly")
    restore = parse({"from-backup": "b-1", "instant": "yes"})
    assert restore.backup == "b-1" and restore.instant
    assert parse(None).empty and parse({}).empty and not o.empty


@pytest.mark.parametrize("opts, named", [
    ({"colour": "red", "sise": "1G"}, ["unknown option(s) colour, sise"]),
    ({"size": "lots"}, ["size='lots'"]),
    ({"size": "1000"}, ["size='1000'", "multiple of 4 KiB"]),
    ({"size": "-4096"}, ["size='-4096'"]),
    ({"replicas": "0"}, ["replicas='0'"]),
    ({"replicas": "eleven"}, ["replicas='eleven'"]),
    ({"fs": "zfs"}, ["fs='zfs'", "ext4, xfs"]),
    ({"pool": "Bad Pool"}, ["pool='Bad Pool'"]),
    ({"from-snapshot": "db"}, ["VOLUME@SNAPSHOT"]),
    ({"from-snapshot": "db@s", "from-backup": "b"}, ["not both"]),
    ({"from-snapshot": "db@s", "size": "1G"}, ["size with from-snapshot"]),
    ({"from-snapshot": "db@s", "pool": "ssd"}, ["pool with from-snapshot"]),
    ({"instant": "true"}, ["instant applies to from-backup only"]),
    ({"preempt": "maybe"}, ["preempt='maybe'"]),
    ({"size": 1024}, ["give a string"]),
])
def test_bad_options_are_each_named(opts, named):
    with pytest.raises(OptionsError) as err:
        parse(opts)
    for part in named:
        assert part in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(OptionsError) as err:
        parse({"size": "x", "fs": "zfs", "colour": "red"})
    text = str(err.value)
    assert "colour" in text and "size='x'" in text and "fs='zfs'" in text
    assert set(dockeropts.KNOWN) <= set(text.replace(",", " ").replace(")", " ").split())


def test_mount_state_survives_a_restart_and_counts_ids(tmp_path):
    path = tmp_path / "state" / "state.json"
    s = MountState(path)
    s.add("db", "/m/db", "c1")
    s.add("db", "/m/db", "c2")
    s.add("db", "/m/db", "c1")  # the same ID twice counts once
    again = MountState(path)  # a new process reading the file
    assert again.get("db").ids == ["c1", "c2"]
    assert again.release("db", "c1").ids == ["c2"]
    assert again.release("db", "unknown").ids == ["c2"]
    assert again.release("nothing", "c1") is None
    last = again.release("db", "c2")
    assert last.pending and MountState(path).get("db").pending  # still to be detached
    again.forget("db")
    assert MountState(path).volumes == {}
    assert not list(path.parent.glob("*.tmp"))
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_a_corrupt_state_file_is_an_error_not_an_empty_state(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the plugin's mount state"):
        MountState(path)
    path.write_text(json.dumps({"version": 99, "volumes": {}}))
    with pytest.raises(ValueError, match="unknown mount state version"):
        MountState(path)
