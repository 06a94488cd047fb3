"""The CSI Identity service: the driver's name and version, its capabilities, readiness."""

from __future__ import annotations

from typing import Any

import grpc

from drove import __version__
from drove.csi.errors import handler
from drove.csi.proto import PLUGIN_NAME, pb, rpc


class Identity(rpc.IdentityServicer):
    """GetPluginInfo, GetPluginCapabilities, Probe."""

    def __init__(self, *, controller: bool, ready: Any = None) -> None:
        self._controller = controller
        # ready(): True once the manager answers; Probe reports it (False: not ready yet).
        self._ready = ready or (lambda: True)

    @handler
    def GetPluginInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The driver's name and drove's version."""
        return pb.GetPluginInfoResponse(name=PLUGIN_NAME, vendor_version=__version__)

    @handler
    def GetPluginCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        """CONTROLLER_SERVICE (when this process serves it), topology, online expansion."""
        service = pb.PluginCapability.Service
        caps = [pb.PluginCapability(service=service(
            type=service.VOLUME_ACCESSIBILITY_CONSTRAINTS))]
        if self._controller:
            caps.insert(0, pb.PluginCapability(service=service(type=service.CONTROLLER_SERVICE)))
        expansion = pb.PluginCapability.VolumeExpansion
        caps.append(pb.PluginCapability(volume_expansion=expansion(type=expansion.ONLINE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    @handler
    def Probe(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Ready when the manager answers."""
        from google.protobuf.wrappers_pb2 import BoolValue

        return pb.ProbeResponse(ready=BoolValue(value=bool(self._ready())))
