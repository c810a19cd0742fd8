"""KServe v2 over gRPC: the ingress's methods for Ray Serve's gRPC proxy (a mixin of `serving.ingress.Ingress`).

Method names are the RPC names of inference.GRPCInferenceService. No protobuf types appear in
annotations (Ray Serve inspects them); importing serving.grpc_stubs installs the module alias that
lets the stub messages pickle between the proxy and the replica.
"""

from __future__ import annotations

import time

import serving.grpc_stubs  # installs the grpc_service_pb2 alias before any message is unpickled
from premier.errors import InvalidRequestError
from serving import kserve
from serving.api_kserve import response_parameters
from serving.protocol import GenerateParams, RequestError, grpc_code


class KServeGRPC:
    def _grpc_authorized(self, grpc_context) -> bool:
        from serving import auth

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

    async def ServerLive(self, request):
        return serving.grpc_stubs.service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request):
        return serving.grpc_stubs.service_pb2.ServerReadyResponse(ready=await self.is_ready())

    async def ServerMetadata(self, request):
        meta = kserve.server_metadata()
        return serving.grpc_stubs.service_pb2.ServerMetadataResponse(**meta)

    async def ModelReady(self, request, grpc_context):
        pb = serving.grpc_stubs.service_pb2
        try:
            kserve.check_model(request.name, request.version)
        except kserve.UnknownModelError as e:
            self._grpc_fail(grpc_context, RequestError(404, str(e)))
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self.is_ready())

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
