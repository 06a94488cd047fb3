"""The two secrets of a cluster, kept in the shared store and copied to each manager's files.

* the **API token** (``DATA_DIR/token``): users and the CLI call the manager's API with it;
* the **cluster token** (``DATA_DIR/cluster-token``): agents and managers call each other
  with it (an agent's heartbeat, a manager's calls to an agent's API).

Neither opens the other's door. Whichever manager starts first creates each token with a
create-if-absent put, so managers starting together agree on one value; a token already in
the manager's file (a data directory used before) is the one offered.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from drove.manager.store import ConflictError, Store, StoreError

KIND = "secrets"
API_FILE = "token"
CLUSTER_FILE = "cluster-token"


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` readable by its owner only (0600), replacing it atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


def shared_token(store: Store, key: str, offer: str | None = None) -> str:
    """The token ``key`` in the store, created (``offer`` or a new random one) if absent."""
    doc = store.get(KIND, key)
    if doc is None:
        # Another manager may create it first: then its value holds.
        with contextlib.suppress(ConflictError):
            store.put(KIND, key, {"value": offer or secrets.token_urlsafe(32)}, expect_version=0)
        doc = store.get(KIND, key)
    if doc is None or not doc.get("value"):
        raise StoreError(f"the store holds no {key}; it was deleted while starting")
    return str(doc["value"])


def cluster_tokens(store: Store, data_dir: Path) -> tuple[str, str]:
    """(API token, cluster token), agreed through the store and written to this manager's
    ``DATA_DIR/token`` and ``DATA_DIR/cluster-token`` (StoreError: the store fails)."""
    api = shared_token(store, "api-token", _read(data_dir / API_FILE))
    offer = _read(data_dir / CLUSTER_FILE)
    # A cluster token copied from the API token's file would open both doors: a new one.
    cluster = shared_token(store, "cluster-token", None if offer == api else offer)
    for name, value in ((API_FILE, api), (CLUSTER_FILE, cluster)):
        if _read(data_dir / name) != value:
            write_secret(data_dir / name, value)
    return api, cluster
