"""The Docker volume plugin with a real dockerd, real containers and a real drove serve."""

from __future__ import annotations

import json
import os
import secrets
import signal
from pathlib import Path

import pytest

from agenttools import agent_node
from containertools import IMAGE, Dockerd, PluginProc, busybox_tar, wait_for


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory):
    """One dockerd for the module, with the busybox image imported."""
    root = tmp_path_factory.mktemp("dockerd")
    d = Dockerd(root).start()
    try:
        d.docker("import", str(busybox_tar(root / "bb.tar")), IMAGE)
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def driver_name():
    """The module's plugin name: dockerd keeps calling a plugin it knew (a stopped one for
    ~15 s per call), so every test serves the same name, for its own manager."""
    return f"drove-{secrets.token_hex(4)}"


@pytest.fixture
def plugin(manager, tmp_path, dockerd, driver_name):
    """`drove plugin docker` for this test's manager."""
    p = PluginProc(manager, tmp_path, driver_name).start()
    yield p
    ids = dockerd.docker("ps", "-aq", check=False).stdout.split()
    if ids:
        dockerd.docker("rm", "-f", *ids, check=False)
    p.stop()


def state_of(manager, name: str) -> str:
    """The drove volume's state."""
    return manager.volume(name)["state"]


def create(dockerd, plugin, name: str, *opts: str) -> None:
    """`docker volume create -d PLUGIN --opt ... NAME`."""
    args = [a for o in opts for a in ("--opt", o)]
    dockerd.docker("volume", "create", "-d", plugin.name, *args, name)


def test_create_write_read_inspect_remove(dockerd, plugin, manager):
    create(dockerd, plugin, "web", "size=64M", "replicas=1")
    v = manager.volume("web")
    assert v["size"] == 64 << 20 and v["replica_count"] == 1 and v["state"] == "detached"
    assert "web" in dockerd.docker("volume", "ls", "-q").stdout.split()

    out = dockerd.run("web:/data", "echo hello > /data/f && sync && df -P /data | tail -1")
    assert "/dev/loop" in out.stdout  # a drove device, not Docker's local directory
    assert state_of(manager, "web") == "detached"  # the container left: detached
    assert dockerd.run("web:/data", "cat /data/f").stdout == "hello\n"

    inspect = dockerd.docker("volume", "inspect", "web").stdout
    assert '"Scope": "global"' in inspect and '"size": 67108864' in inspect
    assert plugin.state()["volumes"] == {}
    dockerd.docker("volume", "rm", "web")
    assert manager.api("GET", "/v1/volumes/web").status_code == 404


def test_bad_options_are_refused_naming_them(dockerd, plugin, manager):
    r = dockerd.docker("volume", "create", "-d", plugin.name, "--opt", "size=lots",
                       "--opt", "colour=red", "--opt", "fs=zfs", "--opt", "replicas=0",
                       "bad", check=False)
    assert r.returncode != 0
    for part in ("unknown option(s) colour", "size='lots'", "fs='zfs'", "replicas='0'"):
        assert part in r.stderr, r.stderr
    r = dockerd.docker("volume", "create", "-d", plugin.name, "--opt", "size=1G",
                       "--opt", "from-snapshot=src@s1", "bad2", check=False)
    assert r.returncode != 0 and "size with from-snapshot" in r.stderr, r.stderr
    assert manager.ok("GET", "/v1/volumes") == []  # nothing was created
    assert "bad" not in dockerd.docker("volume", "ls", "-q").stdout.split()


def test_two_containers_share_one_mount_until_the_last_stops(dockerd, plugin, manager):
    create(dockerd, plugin, "shared", "size=320M", "replicas=1", "fs=xfs")  # xfs: >= 300M
    first = dockerd.docker("run", "-d", "--network=none", "-v", "shared:/data", IMAGE,
                           "/bin/sh", "-c", "echo one > /data/one; sleep 600").stdout.strip()
    wait_for(lambda: state_of(manager, "shared") == "attached", 30, "the volume attached")
    v = manager.volume("shared")
    assert v["fs"] == "xfs" and v["mountpoint"] == plugin.mountpoint("shared")
    second = dockerd.run("shared:/data", "cat /data/one; echo two > /data/two")
    assert second.stdout == "one\n"
    # The second container left; the first still uses the volume: still mounted.
    assert state_of(manager, "shared") == "attached"
    assert list(plugin.state()["volumes"]["shared"]["ids"]) != []
    assert len(plugin.state()["volumes"]["shared"]["ids"]) == 1
    assert dockerd.docker("exec", first, "cat", "/data/two").stdout == "two\n"
    dockerd.docker("rm", "-f", first)
    wait_for(lambda: state_of(manager, "shared") == "detached", 30, "the volume detached")
    assert plugin.state()["volumes"] == {}
    assert not os.path.ismount(plugin.mountpoint("shared"))
    # A volume in use here cannot be removed by docker; once free it can.
    dockerd.docker("volume", "rm", "shared")


def test_a_volume_attached_elsewhere_is_never_mounted_twice(dockerd, plugin, manager,
                                                            tmp_path):
    create(dockerd, plugin, "taken", "size=64M", "replicas=1")
    manager.cli("volume", "attach", "taken", "--mount", str(tmp_path / "by-hand"))
    r = dockerd.run("taken:/data", "true", check=False)
    assert r.returncode != 0
    assert "attached on this node at" in r.stderr and "by someone else" in r.stderr, r.stderr
    assert manager.volume("taken")["mountpoint"] == str(tmp_path / "by-hand")
    r = dockerd.docker("volume", "rm", "taken", check=False)
    assert r.returncode != 0 and "is attached on node" in r.stderr, r.stderr
    manager.cli("volume", "detach", "taken")


def test_linked_clone_from_a_snapshot(dockerd, plugin, manager):
    create(dockerd, plugin, "src", "size=64M", "replicas=1")
    dockerd.run("src:/data", "echo original > /data/f")
    manager.cli("volume", "attach", "src")
    manager.cli("snapshot", "create", "src", "s1")
    manager.cli("volume", "detach", "src")
    dockerd.run("src:/data", "echo changed > /data/f")
    create(dockerd, plugin, "copy", "from-snapshot=src@s1")
    assert manager.volume("copy")["clone_of"] == {"volume": "src", "snapshot": "s1"}
    assert dockerd.run("copy:/data", "cat /data/f").stdout == "original\n"
    assert dockerd.run("src:/data", "cat /data/f").stdout == "changed\n"


def test_plugin_restart_keeps_its_mounts(dockerd, plugin, manager):
    create(dockerd, plugin, "kept", "size=64M", "replicas=1")
    first = dockerd.docker("run", "-d", "--network=none", "-v", "kept:/data", IMAGE,
                           "/bin/sh", "-c", "echo before > /data/f; sleep 600").stdout.strip()
    wait_for(lambda: state_of(manager, "kept") == "attached", 30, "the volume attached")
    plugin.stop(signal.SIGKILL)  # a crash: nothing cleaned up
    plugin.start()
    assert dockerd.run("kept:/data", "cat /data/f").stdout == "before\n"
    assert state_of(manager, "kept") == "attached"  # the first container still holds it
    dockerd.docker("rm", "-f", first)
    wait_for(lambda: state_of(manager, "kept") == "detached", 30, "the volume detached")


def test_dockerd_restart_with_a_volume_in_use(dockerd, plugin, manager):
    create(dockerd, plugin, "busy", "size=64M", "replicas=1")
    cid = dockerd.docker("run", "-d", "--network=none", "-v", "busy:/data", IMAGE,
                         "/bin/sh", "-c", "echo $(cat /data/n 2>/dev/null)x > /data/n; sync; "
                                          "sleep 600").stdout.strip()
    wait_for(lambda: state_of(manager, "busy") == "attached", 30, "the volume attached")
    dockerd.stop()  # its containers stop with it; docker unmounts their volumes
    wait_for(lambda: state_of(manager, "busy") == "detached", 30, "the volume detached")
    dockerd.start()
    dockerd.docker("start", cid)  # the same container, its volume mounted again
    wait_for(lambda: "xx" in dockerd.docker("exec", cid, "cat", "/data/n", check=False).stdout,
             30, "the container's second write")
    assert state_of(manager, "busy") == "attached"
    dockerd.docker("rm", "-f", cid)
    wait_for(lambda: state_of(manager, "busy") == "detached", 30, "the volume detached")
    assert plugin.state()["volumes"] == {}


def test_dockerd_killed_with_a_volume_in_use(dockerd, plugin, manager):
    """A killed dockerd never unmounts its containers' volumes: the plugin keeps their mount
    IDs, and releases them once no mount namespace holds the volume any more."""
    create(dockerd, plugin, "orphan", "size=64M", "replicas=1")
    cid = dockerd.docker("run", "-d", "--network=none", "-v", "orphan:/data", IMAGE,
                         "/bin/sh", "-c", "echo kept > /data/f; sync; sleep 600").stdout.strip()
    wait_for(lambda: state_of(manager, "orphan") == "attached", 30, "the volume attached")
    dockerd.kill()
    dockerd.start()  # it finds the container's process and kills it, unmounting nothing
    wait_for(lambda: dockerd.docker("inspect", "-f", "{{.State.Running}}", cid)
             .stdout.strip() == "false", 30, "the container stopped")
    assert state_of(manager, "orphan") == "attached"
    assert len(plugin.state()["volumes"]["orphan"]["ids"]) == 1
    dockerd.docker("rm", cid)
    dockerd.docker("volume", "rm", "orphan")
    assert manager.api("GET", "/v1/volumes/orphan").status_code == 404
    assert plugin.state()["volumes"] == {}


def df_kib(dockerd, cid: str) -> int:
    """The size of /data in container ``cid``, as its df says (KiB)."""
    return int(dockerd.docker("exec", cid, "df", "-P", "/data").stdout.splitlines()[-1]
               .split()[1])


@pytest.mark.slow  # ~20 s: a backup, a restore, and 400 MiB written in the container
def test_a_restored_volume_grows_while_a_container_uses_it(dockerd, plugin, manager,
                                                           tmp_path):
    (tmp_path / "backups").mkdir()
    manager.cli("backup", "target", "set", f"file://{tmp_path / 'backups'}")
    create(dockerd, plugin, "orig", "size=320M", "replicas=1", "fs=xfs")
    dockerd.run("orig:/data", "echo backed-up > /data/f")
    manager.cli("volume", "attach", "orig")
    backup = manager.cli_json("backup", "create", "orig")["name"]
    manager.cli("volume", "detach", "orig")

    create(dockerd, plugin, "restored", f"from-backup={backup}", "fs=xfs")
    assert manager.volume("restored")["labels"]["fs"] == "xfs"
    cid = dockerd.docker("run", "-d", "--network=none", "-v", "restored:/data", IMAGE,
                         "/bin/sh", "-c", "sleep 600").stdout.strip()
    wait_for(lambda: state_of(manager, "restored") == "attached", 30, "the volume attached")
    assert dockerd.docker("exec", cid, "cat", "/data/f").stdout == "backed-up\n"
    before = df_kib(dockerd, cid)
    manager.cli("volume", "expand", "restored", "--size", "640M")  # online, in use
    after = df_kib(dockerd, cid)
    assert after > before + 250 * 1024, (before, after)
    dockerd.docker("exec", cid, "dd", "if=/dev/zero", "of=/data/big", "bs=1M", "count=400")
    assert dockerd.docker("exec", cid, "cat", "/data/f").stdout == "backed-up\n"


def test_a_missing_volume_and_the_implicit_create(dockerd, plugin, manager):
    """`docker run -v NAME:/data --volume-driver PLUGIN` creates NAME with the defaults."""
    manager.ok("PATCH", "/v1/settings", json={"default_replicas": 1})
    out = dockerd.run("implicit:/data", "df -P /data | tail -1", "--volume-driver",
                      plugin.name)
    assert "/dev/loop" in out.stdout
    assert manager.volume("implicit")["size"] == 64 << 20  # the plugin's --default-size
    assert Path(plugin.state_dir / "state.json").exists()


@pytest.fixture
def other_node(manager, tmp_path):
    """A second node, "other": a `drove agent` of its own on this machine."""
    with agent_node(manager, tmp_path) as name:
        yield name


def test_a_volume_on_another_node_is_refused_or_preempted(dockerd, plugin, manager,
                                                          other_node, tmp_path):
    create(dockerd, plugin, "roams", "size=64M", "replicas=1")
    elsewhere = tmp_path / "on-other"
    manager.ok("POST", "/v1/volumes/roams/attach", json={"node": other_node,
                                                         "mount": str(elsewhere)})
    (elsewhere / "mark").write_text("written on other\n")
    r = dockerd.run("roams:/data", "true", check=False)
    assert r.returncode != 0
    assert "is attached on node other" in r.stderr and "preempt=true" in r.stderr, r.stderr
    v = manager.volume("roams")
    assert v["node"] == other_node and v["mountpoint"] == str(elsewhere)  # left alone

    manager.cli("volume", "update", "roams", "--label", "preempt=true")
    assert dockerd.run("roams:/data", "cat /data/mark").stdout == "written on other\n"
    assert not os.path.ismount(elsewhere)  # taken from the other node, not mounted twice
    assert manager.volume("roams")["state"] == "detached"
    attached = [e["message"] for e in manager.events("roams") if e["kind"] == "volume-attached"]
    assert any("on node other" in m for m in attached)
    assert any(plugin.mountpoint("roams") in m for m in attached)


def test_a_detach_left_pending_is_done_at_the_next_start(manager, tmp_path):
    """A volume whose last container left while its detach failed is recorded without IDs;
    the plugin detaches it when it starts again (no engine needed for that)."""
    p = PluginProc(manager, tmp_path)
    manager.cli("volume", "create", "pending", "--size", "64M", "--replicas", "1")
    manager.ok("POST", "/v1/volumes/pending/attach", json={"mount": p.mountpoint("pending")})
    p.state_dir.mkdir(parents=True, exist_ok=True)
    (p.state_dir / "state.json").write_text(json.dumps({"version": 1, "volumes": {
        "pending": {"mountpoint": p.mountpoint("pending"), "ids": []}}}))
    p.start()
    try:
        assert state_of(manager, "pending") == "detached"
        assert p.state()["volumes"] == {}
        assert not os.path.exists(p.mountpoint("pending"))
    finally:
        p.stop()
