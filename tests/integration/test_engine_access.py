"""Who may use an engine: its control API wants the volume's access key (as its replicas'
do), and its NBD export is for clients on its own host unless a setting opens it.

* By hand: `drove engine serve` started with DROVE_NBD_KEY (as the agent starts every
  engine) refuses control calls with no key or a wrong one (401, saying what to send) and
  changes nothing for them; `drove engine ...` sends the key from DROVE_NBD_KEY.
* On namespace hosts (tests/hosts.py): `drove serve` on m, an agent on a, a volume attached
  on a: its NBD export answers qemu-io and nbdinfo on a, and nothing on a's address from m;
  with `engine_nbd_listen` set to `node` the next attach serves it on a's address.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from cluster import AgentOnHost, Cli, ManagerOnHost, drove_argv, poll
from drove.replica.access import KEY_ENV, bearer, new_key
from enginetools import start_engine
from hosts import Host
from replicatools import kill_all, start_replica

pytestmark = pytest.mark.timeout(300)


def test_the_engine_control_api_wants_the_volume_key(tmp_path: Path, monkeypatch) -> None:
    key = new_key()
    monkeypatch.setenv(KEY_ENV, key)  # the replicas and the engine start with it
    replicas = [start_replica(tmp_path / n, "16M") for n in ("r0", "r1")]
    procs = list(replicas)
    try:
        engine = start_engine(tmp_path / "engine", "vol", replicas, names=["r0", "r1"])
        procs.append(engine)
        url = engine.control
        for headers, given in (({}, "no key"), (bearer(new_key()), "a wrong key"),
                               ({"Authorization": key}, "a wrong key")):
            for method, path, body in (("GET", "/v1/info", None),
                                       ("POST", "/v1/snapshots", {"name": "s1"}),
                                       ("DELETE", "/v1/replicas/r1", None)):
                r = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.headers.get("www-authenticate") == "Bearer"
                detail = r.json()["detail"]
                assert given in detail and "Authorization: Bearer" in detail, detail
        # Nothing the refused calls asked for happened.
        ok = bearer(key)
        layers = httpx.get(url + "/v1/snapshots", headers=ok, timeout=30).json()
        assert layers and not [la for la in layers if la.get("name") == "s1"], layers
        info = httpx.get(url + "/v1/info", headers=ok, timeout=30).json()
        assert {r["name"]: r["mode"] for r in info["replicas"]} == {"r0": "RW", "r1": "RW"}
        # The CLI sends DROVE_NBD_KEY; without it, it says what the engine wants.
        env = {**os.environ}
        cli = subprocess.run(drove_argv("engine", "info", "--url", url, "--json"), env=env,
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and '"health": "healthy"' in cli.stdout, cli.stderr
        env.pop(KEY_ENV)
        cli = subprocess.run(drove_argv("engine", "info", "--url", url), env=env,
                             capture_output=True, text=True, timeout=60)
        said = " ".join(cli.stderr.split())  # the CLI wraps its message
        assert cli.returncode != 0 and "HTTP 401" in said and "carried no key" in said, said
    finally:
        kill_all(procs)


def nbdinfo_on(host: Host, uri: str) -> subprocess.CompletedProcess[str]:
    """`nbdinfo --size URI` run on ``host``."""
    return host.call(["nbdinfo", "--size", uri], timeout=60)


def test_the_engine_nbd_export_serves_its_own_host_only(hosts) -> None:
    m, a = hosts.add("m"), hosts.add("a")
    mgr = ManagerOnHost(m, "sqlite").start()
    cli = Cli(m, [mgr.url], mgr.token)
    AgentOnHost(a, [mgr.url], mgr.cluster_token_file).start()
    poll(lambda: any(d["state"] == "ready" for d in cli.node("a")["disks"]), 60,
         "a's disk ready")
    for n in cli.json("node", "list"):
        if n["name"] != "a":
            cli.run("node", "cordon", n["name"])  # the manager's own node holds no replica
    cli.run("volume", "create", "v", "--size", "16M", "--replicas", "1")
    att = cli.json("volume", "attach", "v", "--node", "a")
    # The manager's calls carry the key: it reads the engine's health.
    assert att["node"] == "a" and att["health"] == "healthy", att["replicas"]
    uri, port = att["nbd_uri"], int(att["nbd_uri"].rsplit(":", 1)[1].split("/")[0])
    assert uri.startswith("nbd://127.0.0.1:"), uri

    # On a: local clients work, over TCP loopback and the unix socket.
    local = nbdinfo_on(a, uri)
    assert local.returncode == 0 and int(local.stdout) == 16 << 20, local.stderr
    a.check_call(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 1M", "-c", "flush", uri])
    sock = f"nbd+unix:///v?socket={att['nbd_unix']}"
    out = a.check_output(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x3c 0 1M", sock])
    assert "Pattern verification failed" not in out, out
    # From m: nothing listens on a's address at that port.
    remote = nbdinfo_on(m, f"nbd://{a.address}:{port}/v")
    assert remote.returncode != 0, remote.stdout
    assert "refused" in remote.stderr.lower(), remote.stderr
    # Nor does the engine's control API answer m without the key (the manager has it).
    r = m.call(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                att["engine"]["control_url"] + "/v1/info"])
    assert r.stdout == "401", (r.stdout, r.stderr)

    # Opened by the setting: the next attach serves the export on a's address.
    cli.run("settings", "set", "engine_nbd_listen", "node")
    cli.run("volume", "detach", "v")
    att = cli.json("volume", "attach", "v", "--node", "a")
    assert att["nbd_uri"].startswith(f"nbd://{a.address}:"), att
    remote = nbdinfo_on(m, att["nbd_uri"])
    assert remote.returncode == 0 and int(remote.stdout) == 16 << 20, remote.stderr
