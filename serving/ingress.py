"""The ingress deployment: HTTP (/v1 JSON API, KServe v2 HTTP, /metrics) and KServe v2 gRPC.

It validates and authenticates, admits at most a bounded number of generation requests (above
the bound it answers 503 with Retry-After at once, never letting a request time out in a queue),
forwards each image request to the Generator deployment (which batches across users) and records
metrics. It holds no model: model facts come from a generator (`info`). It is the one serving
process that opens the user store (serving/users.py; it runs on the Ray head, the store's node):
it resolves each request's user to an embedding (or a training-user id) that it sends with the
request, so generators never touch the store and run on any node. It also serves user reads and
DELETE; fit jobs come from a stateless FitJobManager (state lives in the Ray Jobs API and the
store), so a restarted ingress still knows them.

No `from __future__ import annotations` here: Ray Serve's class-based FastAPI views need the
route annotations (request bodies, `Request`) as real types.
"""

import asyncio
import base64
import io
import json
import logging
import random
import time
from typing import Any, Optional

import grpc
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

import serving.grpc_stubs  # noqa: F401 - installs the grpc_service_pb2 alias before any message is unpickled
from premier.errors import CheckpointError, InvalidEmbeddingError, InvalidRequestError, UnknownUserError
from premier.requests import MAX_SEED
from serving import kserve
from serving.config import MODEL_NAME, ServeConfig
from serving.fitting import FitJobManager, FitUnavailableError, UnknownJobError, UploadTooLargeError
from serving.generator import error_for, error_result
from serving.metrics import ServeMetrics

log = logging.getLogger("ray.serve")

GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
              503: grpc.StatusCode.UNAVAILABLE}  # fmt: skip

api = FastAPI(
    title="Premier Serve",
    description="Personalized text-to-image generation: one image per (prompt, user, seed), many users per forward. "
    "Also speaks the KServe v2 / Open Inference Protocol under /v2 (and over gRPC).",
    version="1",
)
_bearer = HTTPBearer(auto_error=False, description="the server's API key, if it has one")


def require_key(creds: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
    from serving import auth  # imported when called: see serving.auth

    if not auth.accepts(creds.credentials if creds is not None else None):
        raise StarletteHTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")


AUTH = [Depends(require_key)]


def _error(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": message} if field is None else {"error": message, "field": field}
    return JSONResponse(body, status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
    field = ".".join(loc) or "body"
    return JSONResponse({"error": f"{field}: {first.get('msg')}", "field": field,
                         "detail": json.loads(json.dumps(errs, default=str))}, status_code=422)  # fmt: skip


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return _error(exc.status_code, str(exc.detail), headers=headers)


class GenerateBody(BaseModel):
    """POST /v1/generate. Omitted settings take the model's defaults; an omitted seed is drawn at random."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="text prompt")
    user_id: Optional[str] = Field(None, description="user id (store or checkpoint); null or omitted: plain FLUX")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="noise seed; omitted: random (returned)")
    steps: Optional[int] = Field(None, description="denoising steps")
    height: Optional[int] = Field(None, description="pixels, a multiple of the model's size multiple")
    width: Optional[int] = Field(None, description="pixels, a multiple of the model's size multiple")
    guidance: Optional[float] = Field(None, description="FLUX distilled guidance scale")
    format: str = Field("png", pattern="^(png|json)$", description="'png': image/png with timings in headers; "
                        "'json': base64 PNG, seed and timings")  # fmt: skip


def png_bytes(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: Any, args: dict[str, Any]):
        self.config = ServeConfig.model_validate(args)
        self.generator = generator
        from serving import auth

        auth.set_key(self.config.api_key.get_secret_value() if self.config.api_key else None)
        self.admitted = 0
        self.bound = self.config.admission_bound
        self.metrics = ServeMetrics(fit_counts=self._fit_counts)
        from serving.app import prepare_store
        from serving.users import UserDirectory

        prepare_store(self.config)  # here, not where the app is built: only the store's node opens it
        self.users = UserDirectory(self.config)
        self._fit: Any = None
        self._fit_error: str | None = None
        self._info: dict[str, Any] | None = None

    # ------------------------------------------------------------------ shared pieces
    async def model_info(self, timeout_s: float = 30.0) -> dict[str, Any]:
        if self._info is None:
            self._info = await asyncio.wait_for(self.generator.info.remote(), timeout_s)
        return self._info

    async def is_ready(self) -> bool:
        try:
            await self.model_info(timeout_s=5.0)
            return True
        except Exception:  # noqa: BLE001 - not ready, whatever the reason
            return False

    def busy(self, message: str) -> dict[str, Any]:
        return error_result(503, message)

    async def run_generation(self, params: dict[str, Any], protocol: str) -> dict[str, Any]:
        """Admit (or refuse at once), forward to a generator, record refusals. Always returns a result dict."""
        if self.admitted >= self.bound:
            self.metrics.refused(protocol, 503)
            return self.busy(f"server busy: {self.admitted} requests queued or running (bound {self.bound}); retry later")
        params = dict(params, received_at=time.time())
        if params.get("seed") is None:
            params["seed"] = random.randrange(2**31)
        self.admitted += 1
        self.metrics.queue_depth.set(self.admitted)
        try:
            user_id = params.get("user_id")
            params.update(await asyncio.to_thread(self._resolve_user, user_id) if user_id else self._resolve_user(user_id))
            result = await asyncio.wait_for(self.generator.generate.remote(params), self.config.request_timeout_s)
        except BackPressureError:
            result = self.busy("server busy: the generators' queues are full; retry later")
        except RayActorError as e:
            log.warning("generator replica lost: %s", type(e).__name__)
            result = self.busy("a generator replica was lost; retry (it is being replaced)")
        except asyncio.TimeoutError:
            result = self.busy(f"generation took longer than {self.config.request_timeout_s:g}s; retry later")
        finally:
            self.admitted -= 1
            self.metrics.queue_depth.set(self.admitted)
        if not result.get("ok"):
            self.metrics.refused(protocol, result["status"])
        elif "user_cache" in params:
            result["user_cache"] = params["user_cache"]  # the lookup happened here
        return result

    def _resolve_user(self, user_id: Any) -> dict[str, Any]:
        """What the generator gets about the user: `user` and `user_cache`, or `user_error` (answered by the
        generator after its settings and prompt checks, so a request's first error is the same as ever)."""
        from store.errors import StoreError

        try:
            user, cache = self.users.resolve(user_id)
        except (InvalidRequestError, InvalidEmbeddingError, CheckpointError, StoreError) as e:
            return {"user": None, "user_error": error_for(e)}
        return {"user": user, "user_cache": cache}

    def finish(self, result: dict[str, Any], protocol: str, started: float) -> dict[str, float]:
        """Final timings (end to end including encoding, server overhead) and the metrics of a success."""
        t = result["timings"]
        t["end_to_end_s"] = time.perf_counter() - started
        t["server_overhead_s"] = max(0.0, t["end_to_end_s"] - t["pipeline_s"])
        t["batch_size"] = result["batch_size"]
        self.metrics.observe(protocol, result, t["end_to_end_s"])
        return t

    def retry_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.retry_after_s)}

    def error_response(self, result: dict[str, Any]) -> JSONResponse:
        headers = self.retry_headers() if result["status"] == 503 else None
        return _error(result["status"], result["error"], result.get("field"), headers)

    def store(self):
        return self.users.store()

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a store that stopped answering is reopened on next use."""
        self.users.check()

    def fit_manager(self):
        """The fit-job manager, or None (the reason in `_fit_error`) where fitting is not available; retried per call."""
        if self._fit is None:
            try:
                c = self.config
                self._fit = FitJobManager(c.fitting, store_path=c.store, model=c.model, checkpoint=c.checkpoint,
                                          store_resource=c.store_resource)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - reported as 503 on the fit routes
                self._fit_error = f"fitting is not available: {e}"
        return self._fit

    def _fit_counts(self) -> dict[str, int] | None:
        manager = self.fit_manager()  # job state lives in the Jobs API: a new ingress still counts old jobs
        return manager.counts() if manager is not None else None

    # ------------------------------------------------------------------ health
    @api.get("/healthz", tags=["health"], summary="liveness (no auth)")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", tags=["health"], summary="readiness: a generator answers (no auth)")
    async def readyz(self):
        if await self.is_ready():
            return {"status": "ready"}
        return _error(503, "no generator replica is ready yet", headers=self.retry_headers())

    @api.get("/metrics", tags=["metrics"], dependencies=AUTH, summary="Prometheus exposition")
    def metrics_route(self) -> Response:
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)

    # ------------------------------------------------------------------ /v1
    @api.get("/v1/model", tags=["generation"], dependencies=AUTH, summary="defaults, limits and training users")
    async def v1_model(self):
        try:
            return await self.model_info(timeout_s=10.0)
        except Exception:  # noqa: BLE001
            return _error(503, "no generator replica is ready yet", headers=self.retry_headers())

    @api.post("/v1/generate", tags=["generation"], dependencies=AUTH, summary="generate one image",
              responses={200: {"content": {"image/png": {}, "application/json": {}},
                               "description": "PNG (timings in X-Premier-* headers) or JSON with a base64 PNG"},
                         400: {"description": "a bad field (named)"}, 404: {"description": "unknown user"},
                         503: {"description": "busy: retry after Retry-After seconds"}})  # fmt: skip
    async def v1_generate(self, body: GenerateBody):
        started = time.perf_counter()
        params = body.model_dump(exclude={"format"})
        result = await self.run_generation(params, "http")
        if not result.get("ok"):
            return self.error_response(result)
        png = png_bytes(result["image"])
        t = self.finish(result, "http", started)
        h, w = result["image"].shape[:2]
        if body.format == "json":
            return {"image": base64.b64encode(png).decode(), "seed": result["seed"], "user_id": body.user_id,
                    "prompt": body.prompt, "width": w, "height": h, "batch_size": result["batch_size"], "timings": t}  # fmt: skip
        headers = {"X-Premier-Seed": str(result["seed"]), "X-Premier-Batch-Size": str(result["batch_size"]),
                   "X-Premier-Timings": json.dumps(t)}  # fmt: skip
        return Response(png, media_type="image/png", headers=headers)

    @api.get("/v1/users/{user_id}", tags=["users"], dependencies=AUTH, summary="a user's record")
    def v1_get_user(self, user_id: str):
        return self._user_call(lambda: self._describe_user(user_id))

    @api.delete("/v1/users/{user_id}", tags=["users"], dependencies=AUTH, summary="delete a stored user")
    def v1_delete_user(self, user_id: str):
        def delete() -> dict[str, Any]:
            store = self.store()
            if user_id not in store and user_id in store.basis:
                return error_result(409, f"user {user_id!r} is a training user of the checkpoint; it cannot be deleted", "user_id")
            store.delete(user_id)
            return {"deleted": user_id}

        return self._user_call(delete)

    @api.get("/v1/users/{user_id}/neighbors", tags=["users"], dependencies=AUTH,
             summary="the k users with the most similar preference embeddings")  # fmt: skip
    def v1_neighbors(self, user_id: str, k: int = Query(10, ge=1, le=1000, description="how many neighbours")):
        def neighbors() -> dict[str, Any]:
            store = self.store()
            query: Any = user_id
            if user_id not in store and user_id in store.basis:
                query = store.basis.get(user_id)  # a checkpoint user: search by its embedding
            hits = store.nearest(query, k=k)
            return {"user_id": user_id, "k": k,
                    "neighbors": [{"user_id": u, "similarity": s} for u, s in hits if u != user_id]}  # fmt: skip

        return self._user_call(neighbors)

    def _describe_user(self, user_id: str) -> dict[str, Any]:
        from premier.users import validate_user_id

        validate_user_id(user_id)
        store = self.store()
        if user_id in store:
            r = store.get(user_id)
            return {"user_id": user_id, "source": "store", "mode": r.mode, "checkpoint_id": r.checkpoint_id,
                    "servable": r.checkpoint_id == store.checkpoint_id, "fit": r.fit,
                    "created_at": r.created_at, "updated_at": r.updated_at}  # fmt: skip
        if user_id in store.basis:
            return {"user_id": user_id, "source": "checkpoint", "mode": "training", "checkpoint_id": store.checkpoint_id,
                    "servable": True}  # fmt: skip
        raise UnknownUserError(user_id)

    def _user_call(self, fn):
        from store.errors import StoreError

        try:
            out = fn()
        except (InvalidRequestError, InvalidEmbeddingError, CheckpointError, StoreError) as e:
            out = error_for(e)
        if isinstance(out, dict) and out.get("ok") is False:
            return self.error_response(out)
        return out

    @api.post("/v1/users/{user_id}/fit", tags=["fitting"], dependencies=AUTH, status_code=202,
              summary="fit a new user from images and captions (a Ray job); answers 202 with a job id",
              responses={202: {"description": "job submitted: poll GET /v1/jobs/{job_id}"},
                         400: {"description": "a bad image, caption or user id (named)"},
                         413: {"description": "the upload is over the configured limits"},
                         503: {"description": "fitting is not available or busy"}})  # fmt: skip
    async def v1_fit(
        self,
        user_id: str,
        images: list[UploadFile] = File(..., description="the user's images (repeat the field once per image)"),
        captions: list[str] = Form(..., description="one caption per image, in the same order as the images"),
    ):
        from premier.users import validate_user_id

        try:
            validate_user_id(user_id)
            if len(images) != len(captions):
                raise InvalidRequestError("captions", f"{len(captions)} caption(s) for {len(images)} image(s): give one per image, in order")
        except InvalidRequestError as e:
            return self.error_response(error_for(e))
        manager = self.fit_manager()
        if manager is None:
            return _error(503, self._fit_error or "fitting is not available", headers=self.retry_headers())
        files = [(f.filename or f"image{i}", await f.read()) for i, f in enumerate(images)]
        try:
            job_id = await asyncio.to_thread(manager.submit, user_id, files, list(captions))
        except UploadTooLargeError as e:
            return _error(413, str(e), e.field)
        except (InvalidRequestError, InvalidEmbeddingError) as e:
            return self.error_response(error_for(e))
        except FitUnavailableError as e:
            return _error(503, str(e), headers=self.retry_headers())
        return JSONResponse({"job_id": job_id, "user_id": user_id, "status_url": f"/v1/jobs/{job_id}"}, status_code=202)

    @api.get("/v1/jobs/{job_id}", tags=["fitting"], dependencies=AUTH, summary="a fit job's status")
    async def v1_job(self, job_id: str):
        manager = self.fit_manager()
        if manager is None:
            return _error(503, self._fit_error or "fitting is not available", headers=self.retry_headers())
        try:
            return await asyncio.to_thread(manager.status, job_id)
        except InvalidRequestError as e:
            return self.error_response(error_for(e))
        except UnknownJobError as e:
            return _error(404, str(e), "job_id")
        except FitUnavailableError as e:
            return _error(503, str(e), headers=self.retry_headers())

    # ------------------------------------------------------------------ KServe v2 over HTTP
    @api.get("/v2", tags=["kserve-v2"], dependencies=AUTH, summary="server metadata")
    def v2_server(self):
        return kserve.server_metadata()

    @api.get("/v2/health/live", tags=["kserve-v2"], summary="liveness (no auth)")
    def v2_live(self):
        return {"live": True}

    @api.get("/v2/health/ready", tags=["kserve-v2"], summary="readiness (no auth)")
    async def v2_ready(self):
        if await self.is_ready():
            return {"ready": True}
        return _error(503, "not ready", headers=self.retry_headers())

    @api.get("/v2/models/{model_name}", tags=["kserve-v2"], dependencies=AUTH, summary="model metadata")
    @api.get("/v2/models/{model_name}/versions/{version}", tags=["kserve-v2"], dependencies=AUTH, include_in_schema=False)
    def v2_model(self, model_name: str, version: str = ""):
        try:
            kserve.check_model(model_name, version)
        except kserve.UnknownModelError as e:
            return _error(404, str(e))
        return kserve.model_metadata()

    @api.get("/v2/models/{model_name}/ready", tags=["kserve-v2"], summary="model readiness (no auth)")
    @api.get("/v2/models/{model_name}/versions/{version}/ready", tags=["kserve-v2"], include_in_schema=False)
    async def v2_model_ready(self, model_name: str, version: str = ""):
        try:
            kserve.check_model(model_name, version)
        except kserve.UnknownModelError as e:
            return _error(404, str(e))
        if await self.is_ready():
            return {"name": MODEL_NAME, "ready": True}
        return _error(503, "not ready", headers=self.retry_headers())

    @api.post("/v2/models/{model_name}/infer", tags=["kserve-v2"], dependencies=AUTH,
              summary="KServe v2 inference (JSON, or Triton's binary tensor extension)")  # fmt: skip
    @api.post("/v2/models/{model_name}/versions/{version}/infer", tags=["kserve-v2"], dependencies=AUTH,
              include_in_schema=False)  # fmt: skip
    async def v2_infer(self, model_name: str, request: Request, version: str = ""):
        started = time.perf_counter()
        try:
            kserve.check_model(model_name, version)
        except kserve.UnknownModelError as e:
            return _error(404, str(e))
        raw_len = request.headers.get("inference-header-content-length")
        try:
            header_len = int(raw_len) if raw_len is not None else None
        except ValueError:
            return _error(400, f"Inference-Header-Content-Length: {raw_len!r} is not an integer")
        try:
            params, binary, request_id = kserve.parse_http_infer(await request.body(), header_len)
        except InvalidRequestError as e:
            return _error(400, str(e))
        result = await self.run_generation(params, "kserve-http")
        if not result.get("ok"):
            headers = self.retry_headers() if result["status"] == 503 else None
            return _error(result["status"], result["error"], headers=headers)
        t = self.finish(result, "kserve-http", started)
        body, head_len = kserve.http_infer_response(result["image"], binary, request_id, self._response_parameters(result, t))
        headers = {"Inference-Header-Content-Length": str(head_len)} if head_len is not None else None
        return Response(body, media_type="application/octet-stream" if binary else "application/json", headers=headers)

    @staticmethod
    def _response_parameters(result: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
        return {"seed": int(result["seed"]), "batch_size": int(result["batch_size"]), "timings": json.dumps(timings)}

    # ------------------------------------------------------------------ KServe v2 over gRPC (Ray Serve's gRPC proxy)
    # Method names are the RPC names of inference.GRPCInferenceService; no protobuf types in annotations.
    def _grpc_authorized(self, grpc_context) -> bool:
        from serving import auth

        if auth.accepts_header(dict(grpc_context.invocation_metadata() or []).get("authorization")):
            return True
        grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        grpc_context.set_details("missing or wrong API key: send metadata 'authorization: Bearer <key>'")
        return False

    @staticmethod
    def _grpc_fail(grpc_context, status: int, message: str) -> None:
        grpc_context.set_code(GRPC_CODES.get(status, grpc.StatusCode.INTERNAL))
        grpc_context.set_details(message)

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
            self._grpc_fail(grpc_context, 404, str(e))
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self.is_ready())

    async def ModelMetadata(self, request, grpc_context):
        pb = serving.grpc_stubs.service_pb2
        if not self._grpc_authorized(grpc_context):
            return pb.ModelMetadataResponse()
        try:
            kserve.check_model(request.name, request.version)
        except kserve.UnknownModelError as e:
            self._grpc_fail(grpc_context, 404, str(e))
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
            self._grpc_fail(grpc_context, 404, str(e))
            return pb.ModelInferResponse()
        except InvalidRequestError as e:
            self._grpc_fail(grpc_context, 400, str(e))
            return pb.ModelInferResponse()
        result = await self.run_generation(params, "kserve-grpc")
        if not result.get("ok"):
            self._grpc_fail(grpc_context, result["status"], result["error"])
            return pb.ModelInferResponse()
        t = self.finish(result, "kserve-grpc", started)
        return kserve.grpc_infer_response(result["image"], request.id, self._response_parameters(result, t))


__all__ = ["Ingress", "api", "GenerateBody"]
