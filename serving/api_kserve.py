"""KServe v2 (Open Inference Protocol) over HTTP: the ingress's /v2 routes.

Tensor decoding and the model's metadata are serving/kserve.py's, shared with the gRPC methods.
"""

import json
import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from premier.errors import InvalidRequestError
from serving import kserve
from serving.config import MODEL_NAME
from serving.http_api import AUTH, INGRESS, api, error_response
from serving.protocol import GenerateParams, ImageResult, RequestError


def response_parameters(result: ImageResult, timings: dict[str, float]) -> dict[str, Any]:
    """The infer response's `parameters`, the same for HTTP and gRPC."""
    return {"seed": int(result.seed), "batch_size": int(result.batch_size), "timings": json.dumps(timings)}


def _not_ready(ingress: Any) -> Response:
    return error_response(RequestError(503, "not ready"), ingress.retry_headers())


@api.get("/v2", tags=["kserve-v2"], dependencies=AUTH, summary="server metadata")
def v2_server():
    return kserve.server_metadata()


@api.get("/v2/health/live", tags=["kserve-v2"], summary="liveness (no auth)")
def v2_live():
    return {"live": True}


@api.get("/v2/health/ready", tags=["kserve-v2"], summary="readiness (no auth)")
async def v2_ready(ingress: Any = INGRESS):
    if await ingress.is_ready():
        return {"ready": True}
    return _not_ready(ingress)


@api.get("/v2/models/{model_name}", tags=["kserve-v2"], dependencies=AUTH, summary="model metadata")
@api.get("/v2/models/{model_name}/versions/{version}", tags=["kserve-v2"], dependencies=AUTH, include_in_schema=False)
def v2_model(model_name: str, version: str = ""):
    try:
        kserve.check_model(model_name, version)
    except kserve.UnknownModelError as e:
        return error_response(RequestError(404, str(e)))
    return kserve.model_metadata()


@api.get("/v2/models/{model_name}/ready", tags=["kserve-v2"], summary="model readiness (no auth)")
@api.get("/v2/models/{model_name}/versions/{version}/ready", tags=["kserve-v2"], include_in_schema=False)
async def v2_model_ready(model_name: str, version: str = "", ingress: Any = INGRESS):
    try:
        kserve.check_model(model_name, version)
    except kserve.UnknownModelError as e:
        return error_response(RequestError(404, str(e)))
    if await ingress.is_ready():
        return {"name": MODEL_NAME, "ready": True}
    return _not_ready(ingress)


@api.post(
    "/v2/models/{model_name}/infer",
    tags=["kserve-v2"],
    dependencies=AUTH,
    summary="KServe v2 inference (JSON, or Triton's binary tensor extension)",
)
@api.post(
    "/v2/models/{model_name}/versions/{version}/infer", tags=["kserve-v2"], dependencies=AUTH, include_in_schema=False
)
async def v2_infer(model_name: str, request: Request, version: str = "", ingress: Any = INGRESS):
    started = time.perf_counter()
    try:
        kserve.check_model(model_name, version)
    except kserve.UnknownModelError as e:
        return error_response(RequestError(404, str(e)))
    raw_len = request.headers.get("inference-header-content-length")
    try:
        header_len = int(raw_len) if raw_len is not None else None
    except ValueError:
        return error_response(RequestError(400, f"Inference-Header-Content-Length: {raw_len!r} is not an integer"))
    try:
        params, binary, request_id = kserve.parse_http_infer(await request.body(), header_len)
    except InvalidRequestError as e:
        return error_response(RequestError(400, str(e)))
    result = await ingress.run_generation(GenerateParams(**params), "kserve-http")
    if isinstance(result, RequestError):
        return error_response(RequestError(result.status, result.message), ingress.headers_for(result))
    t = ingress.finish(result, "kserve-http", started)
    body, head_len = kserve.http_infer_response(result.image, binary, request_id, response_parameters(result, t))
    headers = {"Inference-Header-Content-Length": str(head_len)} if head_len is not None else None
    return Response(body, media_type="application/octet-stream" if binary else "application/json", headers=headers)


__all__ = ["response_parameters"]
