"""The ingress's /v1 generation routes (GET /v1/model, POST /v1/generate), health and metrics."""

import base64
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from premier.requests import MAX_SEED
from serving.http_api import AUTH, INGRESS, api, error_response
from serving.protocol import GenerateParams, ImageResult, Outcome, Progress, RequestError


class GenerateBody(BaseModel):
    """POST /v1/generate. Omitted settings take the model's defaults; an omitted seed is drawn at random."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="text prompt")
    user_id: str | None = Field(None, description="user id (store or checkpoint); null or omitted: plain FLUX")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="noise seed; omitted: random (returned)")
    steps: int | None = Field(None, description="denoising steps")
    height: int | None = Field(None, description="pixels, a multiple of the model's size multiple")
    width: int | None = Field(None, description="pixels, a multiple of the model's size multiple")
    guidance: float | None = Field(None, description="FLUX distilled guidance scale")
    format: str = Field(
        "png",
        pattern="^(png|json)$",
        description="'png': image/png with timings in headers; 'json': base64 PNG, seed and timings",
    )
    stream: bool = Field(
        False,
        description="server-sent events: 'progress' after each denoising step (step-level batching), then 'image' "
        "(the JSON answer) or 'error'; closing the connection cancels the request",
    )

    def params(self) -> GenerateParams:
        return GenerateParams(**self.model_dump(exclude={"format", "stream"}))


def png_bytes(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


@api.get("/healthz", tags=["health"], summary="liveness (no auth)")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@api.get("/readyz", tags=["health"], summary="readiness: a generator answers (no auth)")
async def readyz(ingress: Any = INGRESS):
    if await ingress.is_ready():
        return {"status": "ready"}
    return error_response(RequestError(503, "no generator replica is ready yet"), ingress.retry_headers())


@api.get("/metrics", tags=["metrics"], dependencies=AUTH, summary="Prometheus exposition")
def metrics_route(ingress: Any = INGRESS) -> Response:
    return Response(ingress.metrics.exposition(), media_type=ingress.metrics.content_type)


@api.get("/v1/model", tags=["generation"], dependencies=AUTH, summary="defaults, limits and training users")
async def v1_model(ingress: Any = INGRESS):
    try:
        return (await ingress.model_info(timeout_s=10.0)).public()
    except Exception:  # no generator yet, whatever the reason
        return error_response(RequestError(503, "no generator replica is ready yet"), ingress.retry_headers())


@api.post(
    "/v1/generate",
    tags=["generation"],
    dependencies=AUTH,
    summary="generate one image",
    responses={
        200: {
            "content": {"image/png": {}, "application/json": {}},
            "description": "PNG (timings in X-Premier-* headers) or JSON with a base64 PNG",
        },
        400: {"description": "a bad field (named)"},
        404: {"description": "unknown user"},
        503: {"description": "busy: retry after Retry-After seconds"},
    },
)
async def v1_generate(body: GenerateBody, ingress: Any = INGRESS):
    started = time.perf_counter()
    if body.stream:
        events = await ingress.stream_generation(body.params(), "http")
        if isinstance(events, RequestError):
            return error_response(events, ingress.headers_for(events))
        return StreamingResponse(
            server_sent_events(events, body, ingress, started),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    result = await ingress.run_generation(body.params(), "http")
    if isinstance(result, RequestError):
        return error_response(result, ingress.headers_for(result))
    png = png_bytes(result.image)
    t = ingress.finish(result, "http", started)
    if body.format == "json":
        return image_json(result, body, png, t)
    headers = {
        "X-Premier-Seed": str(result.seed),
        "X-Premier-Batch-Size": str(result.batch_size),
        "X-Premier-Timings": json.dumps(t),
    }
    return Response(png, media_type="image/png", headers=headers)


def image_json(result: ImageResult, body: GenerateBody, png: bytes, timings: dict[str, float]) -> dict[str, Any]:
    h, w = result.image.shape[:2]
    return {
        "image": base64.b64encode(png).decode(),
        "seed": result.seed,
        "user_id": body.user_id,
        "prompt": body.prompt,
        "width": w,
        "height": h,
        "batch_size": result.batch_size,
        "timings": timings,
    }


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def server_sent_events(
    events: AsyncIterator[Progress | Outcome], body: GenerateBody, ingress: Any, started: float
) -> AsyncIterator[bytes]:
    """progress* then image or error; the last event always comes (errors never break the stream)."""
    async for event in events:
        if isinstance(event, Progress):
            yield sse("progress", event.body())
        elif isinstance(event, RequestError):
            yield sse("error", {"status": event.status, **event.body()})
        else:
            png = png_bytes(event.image)
            yield sse("image", image_json(event, body, png, ingress.finish(event, "http", started)))


__all__ = ["GenerateBody", "png_bytes", "server_sent_events"]
