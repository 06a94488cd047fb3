"""The Docker volume plugin driven by podman (containers.conf names its socket), real
containers over runc, a real drove serve."""

from __future__ import annotations

import pytest

from containertools import PluginProc, Podman, busybox_tar, wait_for

IMAGE = "localhost/bb:latest"


@pytest.fixture
def podman(manager, tmp_path):
    """podman configured with this test's plugin, and the plugin; both gone at teardown."""
    plugin = PluginProc(manager, tmp_path).start()
    p = Podman(tmp_path)
    p.configure({plugin.name: plugin.sock})
    p.podman("import", str(busybox_tar(tmp_path / "bb.tar")), IMAGE)
    p.plugin = plugin
    yield p
    p.close()
    plugin.stop()


def run(podman, volume: str, script: str, *extra: str, check: bool = True):
    """`podman run --rm -v VOLUME:/data` of the busybox image running ``script``."""
    return podman.podman("run", "--rm", "--network=none", "-v", f"{volume}:/data", *extra,
                         IMAGE, "/bin/sh", "-c", script, check=check)


def test_podman_creates_mounts_shares_and_removes(podman, manager):
    name = podman.plugin.name
    podman.podman("volume", "create", "--driver", name, "-o", "size=64M", "-o", "replicas=1",
                  "pv")
    assert manager.volume("pv")["size"] == 64 << 20
    out = run(podman, "pv", "echo from-podman > /data/f && df -P /data | tail -1")
    assert "/dev/loop" in out.stdout
    assert manager.volume("pv")["state"] == "detached"
    assert run(podman, "pv", "cat /data/f").stdout == "from-podman\n"

    # Two containers: the volume stays mounted until the last one stops.
    first = podman.podman("run", "-d", "--network=none", "-v", "pv:/data", IMAGE,
                          "/bin/sh", "-c", "sleep 600").stdout.strip()
    wait_for(lambda: manager.volume("pv")["state"] == "attached", 30, "the volume attached")
    assert run(podman, "pv", "cat /data/f").stdout == "from-podman\n"
    assert manager.volume("pv")["state"] == "attached"
    podman.podman("rm", "-f", "-t", "0", first)
    wait_for(lambda: manager.volume("pv")["state"] == "detached", 30, "the volume detached")

    podman.podman("volume", "rm", "pv")
    assert manager.api("GET", "/v1/volumes/pv").status_code == 404


def test_podman_shows_why_options_are_refused(podman, manager):
    r = podman.podman("volume", "create", "--driver", podman.plugin.name, "-o", "size=lots",
                      "-o", "colour=red", "bad", check=False)
    assert r.returncode != 0
    assert "unknown option(s) colour" in r.stderr and "size='lots'" in r.stderr, r.stderr
    assert manager.ok("GET", "/v1/volumes") == []
