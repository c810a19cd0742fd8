"""KServe v2 over gRPC: the ingress's methods for Ray Serve's gRPC proxy (a mixin of `serving.ingress.Ingress`).

Method names are the RPC names of inference.GRPCInferenceService. No protobuf types appear in
annotations (Ray Serve inspects them); importing serving.grpc_stubs installs the module alias that
lets the stub messages pickle between the proxy and the replica.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import serving.grpc_stubs  # installs the grpc_service_pb2 alias before any message is unpickled
from premier.errors import InvalidRequestError
from serving import kserve
from serving.api_kserve import response_parameters
from serving.protocol import GenerateParams, RequestError, grpc_code

log = logging.getLogger("ray.serve")

# The RPCs of inference.GRPCInferenceService this server does not serve: they answer UNIMPLEMENTED.
UNIMPLEMENTED_RPCS = (
    "ModelStatistics",
    "ModelConfig",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)


def guarded(response: str) -> Callable:
    """An RPC that never leaks an exception: a fault is logged with an id and answered INTERNAL with that id only."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        async def run(self: Any, request: Any, grpc_context: Any = None) -> Any:
            try:
                if grpc_context is None:
                    return await method(self, request)
                return await method(self, request, grpc_context)
            except Exception as e:
                error_id = uuid.uuid4().hex[:16]
                log.error("gRPC %s failed (error %s)", method.__name__, error_id, exc_info=e)
                if grpc_context is not None:
                    grpc_context.set_code(grpc_code(500))
                    grpc_context.set_details(f"internal error {error_id}; it has been logged")
                return getattr(serving.grpc_stubs.service_pb2, response)()

        return run

    return wrap


def _unimplemented(name: str) -> Callable:
    async def rpc(self: Any, request: Any, grpc_context: Any) -> Any:
        grpc_context.set_code(grpc_code(501))
        grpc_context.set_details(f"{name} is not implemented by this server")
        return getattr(serving.grpc_stubs.service_pb2, f"{name}Response")()

    rpc.__name__ = rpc.__qualname__ = name
    return rpc


def loopback_peer(peer: str | None) -> bool:
    """A gRPC peer string ('ipv4:127.0.0.1:5000', 'ipv6:[::1]:5000', 'unix:...') of this machine."""
    from serving.config import is_loopback

    if not peer:
        return False
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else ""
    return is_loopback(host.strip("[]")) if host else False


class KServeGRPC:
    def _grpc_authorized(self, grpc_context) -> bool:
        from serving import auth

        if self.config.grpc_peers == "loopback" and not loopback_peer(grpc_context.peer()):
            self._grpc_fail(grpc_context, RequestError(403, "this server takes gRPC calls from this machine only"))
            return False
        if auth.accepts_header(dict(grpc_context.invocation_metadata() or []).get("authorization")):
            return True
        self._grpc_fail(
            grpc_context, RequestError(401, "missing or wrong API key: send metadata 'authorization: Bearer <key>'")
        )
        return False

    @staticmethod
    def _grpc_fail(grpc_context, error: RequestError) -> None:
        grpc_context.set_code(grpc_code(error.status))
        grpc_context.set_details(error.message)

    @guarded("ServerLiveResponse")
    async def ServerLive(self, request):
        return serving.grpc_stubs.service_pb2.ServerLiveResponse(live=True)

    @guarded("ServerReadyResponse")
    async def ServerReady(self, request):
        return serving.grpc_stubs.service_pb2.ServerReadyResponse(ready=await self.is_ready())

    @guarded("ServerMetadataResponse")
    async def ServerMetadata(self, request):
        meta = kserve.server_metadata()
        return serving.grpc_stubs.service_pb2.ServerMetadataResponse(**meta)

    @guarded("ModelReadyResponse")
    async def ModelReady(self, request, grpc_context):
        pb = serving.grpc_stubs.service_pb2
        try:
            kserve.check_model(request.name, request.version)
        except kserve.UnknownModelError as e:
            self._grpc_fail(grpc_context, RequestError(404, str(e)))
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self.is_ready())

    @guarded("ModelMetadataResponse")
    async def ModelMetadata(self, request, grpc_context):
        pb = serving.grpc_stubs.service_pb2
        if not self._grpc_authorized(grpc_context):
            return pb.ModelMetadataResponse()
        try:
            kserve.check_model(request.name, request.version)
        except kserve.UnknownModelError as e:
            self._grpc_fail(grpc_context, RequestError(404, str(e)))
            return pb.ModelMetadataResponse()
        return kserve.grpc_metadata_response()

    @guarded("ModelInferResponse")
    async def ModelInfer(self, request, grpc_context):
        pb = serving.grpc_stubs.service_pb2
        started = time.perf_counter()
        if not self._grpc_authorized(grpc_context):
            return pb.ModelInferResponse()
        try:
            params = kserve.parse_grpc_infer(request)
        except kserve.UnknownModelError as e:
            self._grpc_fail(grpc_context, RequestError(404, str(e)))
            return pb.ModelInferResponse()
        except InvalidRequestError as e:
            self._grpc_fail(grpc_context, RequestError(400, str(e)))
            return pb.ModelInferResponse()
        result = await self.run_generation(GenerateParams(**params), "kserve-grpc")
        if isinstance(result, RequestError):
            self._grpc_fail(grpc_context, result)
            return pb.ModelInferResponse()
        t = self.finish(result, "kserve-grpc", started)
        return kserve.grpc_infer_response(result.image, request.id, response_parameters(result, t))


__all__ = ["KServeGRPC"]


for _name in UNIMPLEMENTED_RPCS:
    setattr(KServeGRPC, _name, _unimplemented(_name))


async def _model_stream_infer(self: Any, request_stream: Any, grpc_context: Any) -> Any:
    """The streaming RPC (bidirectional): not served; answers UNIMPLEMENTED without reading the stream."""
    grpc_context.set_code(grpc_code(501))
    grpc_context.set_details("ModelStreamInfer is not implemented by this server; use ModelInfer")
    return
    yield  # an async generator: Ray Serve streams what it yields (nothing)


KServeGRPC.ModelStreamInfer = _model_stream_infer
