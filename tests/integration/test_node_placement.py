"""Node attributes against a real `drove serve`: update, cordon, their validation, placement."""

from __future__ import annotations

from pathlib import Path


def _only_node(manager) -> dict:
    (node,) = manager.ok("GET", "/v1/nodes")
    return node


def _settled(node: dict) -> dict:
    """The node without what changes on its own between two reads: its disks' live space
    (other tests write to the same filesystem) and the time it was last seen."""
    disks = [{k: d[k] for k in ("name", "path", "tags", "reserved", "scheduled", "replicas")}
             for d in node["disks"]]
    return {**{k: v for k, v in node.items() if k != "last_seen"}, "disks": disks}


def test_node_update_cordon_and_placement(manager, tmp_path: Path):
    for i in range(2):
        manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / f"disk{i}")})
    node = _only_node(manager)
    name = node["name"]
    assert (node["zone"], node["fault_set"], node["role"], node["cordoned"]) == \
        (None, None, "both", False)

    # Bad input: a clear 4xx, and the node is as it was.
    for path, body, status, says in [
            (f"/v1/nodes/{name}", {"role": "sds"}, 422, "role"),
            (f"/v1/nodes/{name}", {"zone": "Bad Zone"}, 422, "zone"),
            (f"/v1/nodes/{name}", {"cordoned": True}, 422, "cordoned"),
            ("/v1/nodes/nope", {"zone": "z1"}, 404, "no node 'nope'")]:
        r = manager.api("PATCH", path, json=body)
        assert r.status_code == status, (body, r.text)
        assert says in r.json()["detail"], r.text
    assert manager.api("POST", "/v1/nodes/nope/cordon").status_code == 404
    assert _settled(_only_node(manager)) == _settled(node)

    # Cordoned: no new replicas, and the refusal says why and what to do.
    got = manager.cli_json("node", "cordon", name)
    assert got["cordoned"] is True
    r = manager.api("POST", "/v1/volumes", json={"name": "v1", "size": "64M", "replicas": 1})
    assert r.status_code == 409
    assert f"node {name}: cordoned" in r.json()["detail"]
    assert "drove node uncordon" in r.json()["detail"]
    assert manager.ok("GET", "/v1/volumes") == []
    listing = manager.cli("node", "list").stdout
    assert "cordoned" in listing and "yes" in listing
    assert manager.cli_json("node", "uncordon", name)["cordoned"] is False

    # A fault set: the node's two disks may hold only one replica of a volume.
    got = manager.cli_json("node", "update", name, "--zone", "z1", "--fault-set", "rack1")
    assert (got["zone"], got["fault_set"], got["role"]) == ("z1", "rack1", "both")
    r = manager.api("POST", "/v1/volumes", json={"name": "v2", "size": "64M", "replicas": 2})
    assert r.status_code == 409
    assert "fault set rack1 already holds a replica" in r.json()["detail"]
    v = manager.ok("POST", "/v1/volumes", json={"name": "v3", "size": "64M", "replicas": 1})
    assert len(v["replicas"]) == 1
    # "" clears: two replicas fit again on the two disks.
    manager.cli_json("node", "update", name, "--fault-set", "")
    v = manager.ok("POST", "/v1/volumes", json={"name": "v4", "size": "64M", "replicas": 2})
    assert len({r["disk"] for r in v["replicas"]}) == 2

    # A compute-only node holds no replicas.
    r = manager.cli("node", "update", name, "--role", "compute")
    assert "role compute" in r.stdout
    r = manager.api("POST", "/v1/volumes", json={"name": "v5", "size": "64M"})
    assert r.status_code == 409
    assert f"node {name}: role compute holds no replicas" in r.json()["detail"]
    bad = manager.cli("node", "update", name, "--role", "sds", check=False)
    assert bad.returncode != 0 and "sds" in bad.stderr
    assert manager.cli("node", "update", name, check=False).returncode != 0
    manager.cli("node", "update", name, "--role", "both")

    # The attributes outlive a manager restart (its own node is registered again at start).
    manager.stop()
    manager.start()
    node = _only_node(manager)
    assert (node["zone"], node["fault_set"], node["role"], node["cordoned"]) == \
        ("z1", None, "both", False)
    assert any(e["kind"] == "node-updated" for e in manager.events())
