"""Twenty volumes created, attached and written at once through one `drove serve`."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from drove.agent.processes import rss_bytes

VOLUMES = 20


def _kind(pid: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for kind in (b"engine", b"replica"):
        if kind in cmd:
            return kind.decode()
    return "other"


@pytest.mark.slow
def test_twenty_volumes_at_once(manager, tmp_path):
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "d1")})
    names = [f"v{i:02d}" for i in range(VOLUMES)]

    def bring_up(name: str) -> dict:
        manager.ok("POST", "/v1/volumes", json={"name": name, "size": "64M", "replicas": 2})
        v = manager.ok("POST", f"/v1/volumes/{name}/attach", json={})
        pattern = int(name[1:]) + 1
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 4M", v["nbd_uri"]],
                       check=True, capture_output=True, timeout=120)
        return v

    with ThreadPoolExecutor(VOLUMES) as pool:
        vols = list(pool.map(bring_up, names))
    for v in vols:
        pattern = int(v["name"][1:]) + 1
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"read -P {pattern} 0 4M", v["nbd_uri"]],
                       check=True, capture_output=True, timeout=120)
    listed = manager.ok("GET", "/v1/volumes")
    assert len(listed) == VOLUMES
    assert all(v["state"] == "attached" and v["health"] == "healthy" for v in listed)

    # Memory of every process kind once idle (the closing note reports it); the target
    # is an idle engine or replica under 40 MiB.
    time.sleep(6)  # idle processes trim freed I/O buffers after a couple of seconds
    rss: dict[str, list[int]] = {"manager": [rss_bytes(manager.proc.pid) or 0]}
    for pid in manager.pids():
        r = rss_bytes(pid)
        if r:
            rss.setdefault(_kind(pid), []).append(r)
    # best-effort data locality (the default): each engine serves one of its two replicas
    # itself, the other has its own process.
    assert len(rss.get("engine", [])) == VOLUMES and len(rss.get("replica", [])) == VOLUMES
    summary = {k: {"count": len(v), "max_mib": round(max(v) / 2**20, 1),
                   "mean_mib": round(sum(v) / len(v) / 2**20, 1)} for k, v in rss.items()}
    (tmp_path.parent / "rss-summary.json").write_text(json.dumps(summary))
    print("RSS:", json.dumps(summary))
    assert max(rss["engine"] + rss["replica"]) < 40 * 2**20, summary

    with ThreadPoolExecutor(VOLUMES) as pool:
        list(pool.map(lambda n: manager.ok("POST", f"/v1/volumes/{n}/detach", json={}), names))
    assert not manager.pids()
