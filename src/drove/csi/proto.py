"""The CSI messages (``pb``) and service stubs/servicers (``rpc``), compiled from csi.proto.

grpcio-tools compiles ``csi.proto`` in memory at first import (a third of a second), so no
generated code is kept in the tree or on disk and it can never drift from the .proto; the
proto file ships with the package (pyproject's package-data).
"""

from __future__ import annotations

from typing import Any

import grpc

pb: Any
rpc: Any
pb, rpc = grpc.protos_and_services("drove/csi/csi.proto")

PLUGIN_NAME = "csi.drove.io"
"""The driver's name (GetPluginInfo), a StorageClass's ``provisioner``."""

TOPOLOGY_NODE = "topology.drove.io/node"
"""Topology key of the node a volume can be used on (strict-local volumes)."""

TOPOLOGY_ZONE = "topology.drove.io/zone"
"""Topology key of a node's zone (NodeGetInfo)."""
