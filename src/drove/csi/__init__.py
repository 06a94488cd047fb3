"""The CSI driver (`drove csi`): Identity, Controller and Node services over gRPC.

The messages and services are declared in ``csi.proto`` (the spec's names and field
numbers) and compiled when :mod:`drove.csi.proto` is first imported.
"""
