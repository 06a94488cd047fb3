"""drove replica: the differencing-disk chain, its read index and metadata."""

from drove.replica.chain import LayerInfo, Replica, View
from drove.replica.errors import ReplicaError, SnapshotExistsError, SnapshotNotFoundError

__all__ = ["LayerInfo", "Replica", "ReplicaError", "SnapshotExistsError",
           "SnapshotNotFoundError", "View"]
