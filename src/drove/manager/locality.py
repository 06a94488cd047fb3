"""Data locality: which replica of a volume its engine serves itself, and the rules around it.

A volume's ``data_locality`` says where its data should live relative to the
node it is attached on (Longhorn's names and meanings):

* ``disabled``: every replica is a replica process, wherever it is;
* ``best-effort``: one replica on the attach node is served inside the engine
  process (reads stay in-process); when the node holds none, the manager
  builds one there online and then drops a remote one;
* ``strict-local``: exactly one replica, on the attach node, served by the
  engine; attaching anywhere else is refused.

This module holds the decisions only (pure functions over the stored volume
document); :mod:`drove.manager.attach` (at attach) and :mod:`drove.manager.localize`
(on a live volume) carry them out.
"""

from __future__ import annotations

from typing import Any

from drove.manager.errors import ApiError

DISABLED = "disabled"
BEST_EFFORT = "best-effort"
STRICT_LOCAL = "strict-local"
LOCALITIES = (DISABLED, BEST_EFFORT, STRICT_LOCAL)
DEFAULT_LOCALITY = BEST_EFFORT


def check_locality(value: Any, what: str = "data_locality") -> str:
    """``value`` if it names a data locality (ApiError 422 naming the allowed ones)."""
    if value not in LOCALITIES:
        raise ApiError(422, f"{what} must be one of {', '.join(LOCALITIES)}, not {value!r}")
    return str(value)


def locality_of(doc: dict[str, Any], default: str) -> str:
    """The volume's data locality; documents stored before it existed read as ``default``."""
    return str(doc.get("data_locality") or default)


def check_count(locality: str, count: int, volume: str, *, status: int = 422) -> None:
    """Refuse a replica count other than one for a strict-local volume (ApiError ``status``)."""
    if locality == STRICT_LOCAL and count != 1:
        raise ApiError(status, f"volume {volume}: strict-local keeps exactly one replica (on "
                               f"the attach node), not {count}; use --replicas 1, or "
                               f"--data-locality best-effort for more copies")


def live(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The volume's replicas that still count (not abandoned on a lost disk)."""
    return [r for r in doc["replicas"] if r["state"] != "abandoned"]


def check_attach_node(doc: dict[str, Any], node: str, locality: str) -> None:
    """Refuse attaching a strict-local volume on a node that does not hold its replica (409)."""
    if locality != STRICT_LOCAL:
        return
    elsewhere = [r for r in live(doc) if r["node"] != node]
    if elsewhere:
        r = elsewhere[0]
        raise ApiError(409, f"volume {doc['name']} is strict-local: its replica {r['name']} "
                            f"lives on node {r['node']} (disk {r['disk']}), so it attaches "
                            f"only there, not on node {node}; change it with `drove volume "
                            f"update {doc['name']} --data-locality best-effort` first")


def choose_local(doc: dict[str, Any], node: str, usable: set[str]) -> dict[str, Any] | None:
    """The replica the engine should serve itself on ``node`` (None: none qualifies).

    Only replicas in a state in ``usable`` count.  The one that was local
    before wins while it still qualifies (its data is the freshest the engine
    read from); else the first one on the node.
    """
    candidates = [r for r in live(doc) if r["node"] == node and r["state"] in usable]
    for r in candidates:
        if r.get("local"):
            return r
    return candidates[0] if candidates else None


def wants_local(doc: dict[str, Any], rep: dict[str, Any], node: str, locality: str) -> bool:
    """Whether ``rep``, about to be (re)built while attached on ``node``, should be local.

    Yes when locality is on, it lives on the node, and no other replica that
    still counts is the local one already.
    """
    if locality == DISABLED or rep["node"] != node:
        return False
    return not any(r.get("local") and r is not rep for r in live(doc))


def remote_victim(doc: dict[str, Any], node: str,
                  modes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The remote replica to drop once a local one took its place (the least useful one)."""
    remote = [r for r in live(doc) if r["node"] != node and not r.get("local")]
    order = {"failed": 0, "pending": 1, "stopped": 2, "running": 3}
    remote.sort(key=lambda r: (order.get(r["state"], 0),
                               (modes.get(r["name"]) or {}).get("mode") == "RW"))
    return remote[0] if remote else None


__all__ = ["BEST_EFFORT", "DEFAULT_LOCALITY", "DISABLED", "LOCALITIES", "STRICT_LOCAL",
           "check_attach_node", "check_count", "check_locality", "choose_local", "live",
           "locality_of", "remote_victim", "wants_local"]
