"""tritonclient's generated KServe v2 gRPC stubs, made usable inside Ray Serve.

The generated message classes name their module `grpc_service_pb2` (the .proto's file name), not
`tritonclient.grpc.service_pb2`, so pickling them between Ray's gRPC proxy and a replica fails
unless that name resolves. Importing this module installs the alias; Ray Serve's proxy imports it
through `grpc_servicer_functions` (`serving.config.GRPC_SERVICER`) and the ingress imports it too.
"""

from __future__ import annotations

import sys

from tritonclient.grpc import service_pb2, service_pb2_grpc

sys.modules.setdefault("grpc_service_pb2", service_pb2)

add_GRPCInferenceServiceServicer_to_server = service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server

__all__ = ["service_pb2", "add_GRPCInferenceServiceServicer_to_server"]
