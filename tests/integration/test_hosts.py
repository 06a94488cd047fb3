"""The namespace host harness (tests/hosts.py) and a real 3-member etcd cluster on it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hosts import EtcdCluster, Hosts, leftover_links, leftover_namespaces

HTTP_PORT = 8765


def _serve_http(host, tmp_path):
    """Start a python http.server bound to host's address; wait until it answers."""
    (tmp_path / "hello.txt").write_text(f"hi from {host.name}")
    proc = host.run([sys.executable, "-m", "http.server", "--bind", host.address,
                     "--directory", str(tmp_path), str(HTTP_PORT)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host.check_call(["sh", "-c", f"for i in $(seq 100); do curl -sf http://{host.address}:"
                     f"{HTTP_PORT}/hello.txt >/dev/null && exit 0; sleep 0.1; done; exit 1"])
    return proc


def _curl(host, url: str, timeout: float = 2) -> subprocess.CompletedProcess[str]:
    """curl url from inside host, giving up after timeout seconds (exit 28)."""
    return host.call(["curl", "-s", "-m", str(timeout), url], timeout=timeout + 10)


def test_hosts_talk_by_address_not_loopback(hosts, tmp_path):
    a, b = hosts.add("a"), hosts.add("b")
    assert a.address != b.address
    _serve_http(a, tmp_path)
    assert _curl(b, f"http://{a.address}:{HTTP_PORT}/hello.txt").stdout == "hi from a"
    # b's loopback is its own: a's server is not there
    assert _curl(b, f"http://127.0.0.1:{HTTP_PORT}/hello.txt").returncode != 0


def test_kill_leaves_no_process_and_cut_restore(hosts, tmp_path):
    a, b = hosts.add("a"), hosts.add("b")
    _serve_http(a, tmp_path)
    # a child that outlives its parent shell, in the same group
    a.run(["sh", "-c", "sleep 300 & sleep 300"])
    url = f"http://{a.address}:{HTTP_PORT}/hello.txt"
    a.cut()
    res = _curl(b, url, timeout=1)
    assert res.returncode == 28, res  # curl: operation timed out
    a.restore()
    assert _curl(b, url, timeout=5).stdout == "hi from a"
    assert len(a.pids()) >= 3
    a.kill()
    assert a.pids() == []
    assert _curl(b, url, timeout=1).returncode != 0


def test_nothing_left_after_exit(tmp_path):
    with Hosts(tmp_path) as h:
        h.add("x").run(["sleep", "300"])
        assert leftover_namespaces() == ["drv-x"]
    assert leftover_namespaces() == []
    assert leftover_links() == []


def test_nothing_left_when_the_test_fails(tmp_path):
    with pytest.raises(ZeroDivisionError), Hosts(tmp_path) as h:
        h.add("x").run(["sleep", "300"])
        h.add("y").cut()
        1 / 0  # noqa: B018  (a test failing midway)
    assert leftover_namespaces() == [] and leftover_links() == []


def test_bad_host_name_refused(hosts):
    with pytest.raises(ValueError):
        hosts.add("a b")
    assert leftover_namespaces() == []


@pytest.mark.slow
def test_etcd_cluster_survives_one_member(hosts):
    members = [hosts.add(n) for n in ("e1", "e2", "e3")]
    client = hosts.add("client")
    etcd = EtcdCluster(members).start()
    assert etcd.store_url == "etcd://" + ",".join(f"{h.address}:2379" for h in members)
    etcd.etcdctl(client, "put", "k", "v1")
    assert etcd.etcdctl(client, "get", "k", "--print-value-only").strip() == "v1"
    members[0].kill()  # the whole host, its etcd with it
    assert members[0].pids() == []
    etcd.kill(members[0])  # already dead with its host: only reaped
    alive = ",".join(f"http://{h.address}:2379" for h in members[1:])
    assert etcd.etcdctl(client, "get", "k", "--print-value-only",
                        endpoints=alive).strip() == "v1"
    etcd.etcdctl(client, "put", "k2", "v2", endpoints=alive)  # quorum 2 of 3 still writes
    etcd.restart(members[0])
    assert etcd.etcdctl(client, "get", "k2", "--print-value-only",
                        endpoints=f"http://{members[0].address}:2379").strip() == "v2"


def test_leftovers_of_a_crashed_run_are_removed(tmp_path):
    # what a run killed mid-test leaves: a namespace with a process in it, its veth, the bridge
    subprocess.run(["ip", "link", "add", "drv-br0", "type", "bridge"], check=True)
    subprocess.run(["ip", "netns", "add", "drv-old"], check=True)
    subprocess.run(["ip", "link", "add", "drvv9", "type", "veth", "peer", "name", "eth0",
                    "netns", "drv-old"], check=True)
    orphan = subprocess.Popen(["nsenter", "--net=/run/netns/drv-old", "sleep", "300"],
                              start_new_session=True)
    try:
        with Hosts(tmp_path) as h:
            assert leftover_namespaces() == []
            assert leftover_links() == ["drv-br0"]  # only the new run's bridge
            assert orphan.wait(timeout=10) == -9
            assert h.add("a").address.startswith("10.213.0.")
    finally:
        orphan.kill()
        orphan.wait()
    assert leftover_namespaces() == [] and leftover_links() == []


def test_mounts_are_shared_between_hosts_and_the_test(hosts, tmp_path):
    # an agent's mount on a host must be seen by fio started later there and by the test
    a, b = hosts.add("a"), hosts.add("b")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("mounted")
    (tmp_path / "dst").mkdir()
    a.check_call(["mount", "--bind", str(tmp_path / "src"), str(tmp_path / "dst")])
    try:
        assert (tmp_path / "dst" / "f").read_text() == "mounted"
        assert b.check_output(["cat", str(tmp_path / "dst" / "f")]) == "mounted"
    finally:
        subprocess.run(["umount", str(tmp_path / "dst")], check=True)
