"""The ingress's FastAPI app: its auth dependency, its error handlers and the JSON error body.

The routes live in one module per surface (serving/api_v1.py, serving/api_users.py,
serving/api_kserve.py), registered on this one `api`, which `@serve.ingress` wraps. They are plain
functions that get the replica's `Ingress` through the `INGRESS` dependency rather than Ray Serve's
class-based views, whose rewritten signatures do not survive the trip to the replica for methods
defined outside the deployment class.

No `from __future__ import annotations` in the route modules: FastAPI needs the route annotations
(request bodies, `Request`) as real types.
"""

import logging
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.protocol import RequestError, safe_text

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="Premier Serve",
    description="Personalized text-to-image generation: one image per (prompt, user, seed), many users per forward. "
    "Also speaks the KServe v2 / Open Inference Protocol under /v2 (and over gRPC).",
    version="1",
    docs_url=None,  # served below, behind the API key unless `public_docs`
    redoc_url=None,
    openapi_url=None,
)
_bearer = HTTPBearer(auto_error=False, description="the server's API key, if it has one")


def require_key(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    from serving import auth  # imported when called: see serving.auth

    if not auth.accepts(creds.credentials if creds is not None else None):
        raise StarletteHTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")


AUTH = [Depends(require_key)]


def require_key_for_docs(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    from serving import auth

    if not auth.docs_public():
        require_key(creds)


@api.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key_for_docs)])
def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@api.get("/docs", include_in_schema=False, dependencies=[Depends(require_key_for_docs)])
def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="Premier Serve API")


def current_ingress() -> Any:
    """The `serving.ingress.Ingress` of this replica."""
    from ray import serve

    return serve.get_replica_context().servable_object


INGRESS = Depends(current_ingress)


def error_response(error: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the first bad field; the details never echo the input (it may be huge, NaN or not Unicode)."""
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
    field = ".".join(loc) or "body"
    detail = [
        {
            "loc": [safe_text(str(p), 200) for p in e.get("loc", ())],
            "msg": safe_text(str(e.get("msg", "")), 500),
            "type": safe_text(str(e.get("type", "")), 100),
        }
        for e in errs[:20]
    ]
    body = RequestError(422, f"{field}: {first.get('msg')}", field).body()
    return JSONResponse({**body, "detail": detail}, status_code=422)


@api.exception_handler(Exception)
async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not the request's fault: logged with an id; the answer carries the id only (no traceback, no paths)."""
    error_id = uuid.uuid4().hex[:16]
    log.error("%s %s failed (error %s)", request.method, request.url.path, error_id, exc_info=exc)
    return error_response(RequestError(500, f"internal error {error_id}; it has been logged"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return error_response(RequestError(exc.status_code, str(exc.detail)), headers or getattr(exc, "headers", None))


__all__ = ["api", "AUTH", "INGRESS", "current_ingress", "require_key", "error_response"]
