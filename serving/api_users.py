"""The users and fit-job routes of the ingress: GET/DELETE /v1/users/{id}, its neighbours, its fit,
GET/DELETE /v1/jobs/{id}.

User reads, neighbours and DELETE go to the store the ingress holds; fits are submitted as jobs
(serving/fitting.py) whose state lives in the Ray Jobs API, the uploads folder and the store.

A fit's answers: 202 with the job id; 400 for a bad image, caption or user id; 409 when the user
already has a fit job that has not ended (one per user: the answer names it, to poll or cancel;
409 rather than 429 because waiting is not enough, that job must end first); 413 for an upload over
the limits (bytes, pixels read from the headers, decoded bytes of the job); 415 for an image that is
not PNG, JPEG or WebP; 429 with Retry-After when the server holds its most fit jobs (running and
queued); 503 with Retry-After when fitting is not available. Each names the field at fault
(`images[i]`, `captions`, `user_id`) where there is one.
"""

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from premier.errors import InvalidRequestError, UnknownUserError
from premier.users import validate_user_id
from serving.fitting import (
    TERMINAL,
    FitBusyError,
    FitConflictError,
    FitUnavailableError,
    UnknownJobError,
    UnsupportedMediaError,
    UploadTooLargeError,
)
from serving.http_api import AUTH, INGRESS, api, error_response
from serving.protocol import REQUEST_ERRORS, RequestError, error_for


@api.get("/v1/users/{user_id}", tags=["users"], dependencies=AUTH, summary="a user's record")
def v1_get_user(user_id: str, ingress: Any = INGRESS):
    return _user_call(ingress, lambda: _describe_user(ingress, user_id))


@api.delete("/v1/users/{user_id}", tags=["users"], dependencies=AUTH, summary="delete a stored user")
def v1_delete_user(user_id: str, ingress: Any = INGRESS):
    def delete() -> Any:
        store = ingress.store()
        if user_id not in store and user_id in store.basis:
            return RequestError(
                409, f"user {user_id!r} is a training user of the checkpoint; it cannot be deleted", "user_id"
            )
        store.delete(user_id)
        return {"deleted": user_id}

    return _user_call(ingress, delete)


@api.get(
    "/v1/users/{user_id}/neighbors",
    tags=["users"],
    dependencies=AUTH,
    summary="the k users with the most similar preference embeddings",
)
def v1_neighbors(
    user_id: str, k: int = Query(10, ge=1, le=1000, description="how many neighbours"), ingress: Any = INGRESS
):
    def neighbors() -> dict[str, Any]:
        store = ingress.store()
        query: Any = user_id
        if user_id not in store and user_id in store.basis:
            query = store.basis.get(user_id)  # a checkpoint user: search by its embedding
        hits = store.nearest(query, k=k)
        return {
            "user_id": user_id,
            "k": k,
            "neighbors": [{"user_id": u, "similarity": s} for u, s in hits if u != user_id],
        }

    return _user_call(ingress, neighbors)


def _describe_user(ingress: Any, user_id: str) -> dict[str, Any]:
    validate_user_id(user_id)
    store = ingress.store()
    if user_id in store:
        r = store.get(user_id)
        return {
            "user_id": user_id,
            "source": "store",
            "mode": r.mode,
            "checkpoint_id": r.checkpoint_id,
            "servable": r.checkpoint_id == store.checkpoint_id,
            "fit": r.fit,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
        }
    if user_id in store.basis:
        return {
            "user_id": user_id,
            "source": "checkpoint",
            "mode": "training",
            "checkpoint_id": store.checkpoint_id,
            "servable": True,
        }
    raise UnknownUserError(user_id)


def _user_call(ingress: Any, fn: Callable[[], Any]):
    try:
        out = fn()
    except REQUEST_ERRORS as e:
        out = error_for(e)
    if isinstance(out, RequestError):
        return error_response(out, ingress.headers_for(out))
    return out


def _fit_unavailable(ingress: Any, message: str | None = None) -> JSONResponse:
    return error_response(
        RequestError(503, message or ingress._fit_error or "fitting is not available"), ingress.retry_headers()
    )


@api.post(
    "/v1/users/{user_id}/fit",
    tags=["fitting"],
    dependencies=AUTH,
    status_code=202,
    summary="fit a new user from images and captions (a Ray job); answers 202 with a job id",
    responses={
        202: {"description": "job submitted: poll GET /v1/jobs/{job_id}"},
        400: {"description": "a bad image, caption or user id (named)"},
        409: {"description": "the user already has a fit job that has not ended (named in the message)"},
        413: {"description": "the upload is over the configured limits (bytes, pixels, decoded bytes)"},
        415: {"description": "an image that is not PNG, JPEG or WebP (named: images[i])"},
        429: {"description": "the server holds its most fit jobs, running and queued: retry after Retry-After"},
        503: {"description": "fitting is not available"},
    },
)
async def v1_fit(
    user_id: str,
    images: list[UploadFile] = File(..., description="the user's images (repeat the field once per image)"),
    captions: list[str] = Form(..., description="one caption per image, in the same order as the images"),
    ingress: Any = INGRESS,
):
    try:
        validate_user_id(user_id)
        if len(images) != len(captions):
            raise InvalidRequestError(
                "captions", f"{len(captions)} caption(s) for {len(images)} image(s): give one per image, in order"
            )
    except InvalidRequestError as e:
        return error_response(error_for(e))
    manager = ingress.fit_manager()
    if manager is None:
        return _fit_unavailable(ingress)
    files = [(f.filename or f"image{i}", await f.read()) for i, f in enumerate(images)]
    try:
        job_id = await asyncio.to_thread(manager.submit, user_id, files, list(captions))
    except FitBusyError as e:
        return error_response(RequestError(429, str(e)), ingress.retry_headers())
    except FitConflictError as e:
        return error_response(RequestError(409, str(e), e.field))
    except UnsupportedMediaError as e:
        return error_response(RequestError(415, str(e), e.field))
    except UploadTooLargeError as e:
        return error_response(RequestError(413, str(e), e.field))
    except REQUEST_ERRORS as e:
        return error_response(error_for(e))
    except FitUnavailableError as e:
        return _fit_unavailable(ingress, str(e))
    return JSONResponse({"job_id": job_id, "user_id": user_id, "status_url": f"/v1/jobs/{job_id}"}, status_code=202)


MAX_JOB_WAIT_S = 60.0
MAX_JOB_WAITERS = 64
"""Long polls of GET /v1/jobs/{id}?wait= held at once per ingress; beyond, the answer comes at once (wait ignored)."""
_waiters = [0]  # this process's held long polls (the event loop's own count: no lock)


@api.get(
    "/v1/jobs/{job_id}",
    tags=["fitting"],
    dependencies=AUTH,
    summary="a fit job's status (with ?wait=S: once it has ended, or after S seconds)",
)
async def v1_job(
    job_id: str,
    request: Request,
    wait: float = Query(
        0.0,
        ge=0,
        le=MAX_JOB_WAIT_S,
        description="hold the answer until the job has ended or this many seconds have passed (a long poll: one "
        "request per wait instead of many polls, each of which costs the server as much as a fit step)",
    ),
    ingress: Any = INGRESS,
):
    manager = ingress.fit_manager()
    if manager is None:
        return _fit_unavailable(ingress)
    try:
        out = await asyncio.to_thread(manager.status, job_id)
        if wait > 0 and out["status"] not in TERMINAL and _waiters[0] < MAX_JOB_WAITERS:
            _waiters[0] += 1
            try:
                out = await _wait_for_end(manager, job_id, request, wait, out)
            finally:
                _waiters[0] -= 1
        return out
    except InvalidRequestError as e:
        return error_response(error_for(e))
    except UnknownJobError as e:
        return error_response(RequestError(404, str(e), "job_id"))
    except FitUnavailableError as e:
        return _fit_unavailable(ingress, str(e))


async def _wait_for_end(manager: Any, job_id: str, request: Request, wait: float, out: dict) -> dict:
    """The job's status once it has ended, the client has gone or `wait` seconds have passed. While this process's
    resident dispatcher runs the job the check is a lookup (no file or Jobs API read); else every half second."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while out["status"] not in TERMINAL and loop.time() < deadline:
        here = manager.running_here(job_id)
        await asyncio.sleep(min(0.1 if here else 0.5, max(0.0, deadline - loop.time())))
        if await request.is_disconnected():
            break
        if here and manager.running_here(job_id) and loop.time() < deadline:
            continue
        out = await asyncio.to_thread(manager.status, job_id)
    return out


@api.delete(
    "/v1/jobs/{job_id}",
    tags=["fitting"],
    dependencies=AUTH,
    summary="cancel a fit job: it ends STOPPED and writes no user",
    responses={
        200: {"description": "the job has ended (STOPPED now, or how it had ended before): its state"},
        202: {"description": "the job is being stopped: its state; poll GET /v1/jobs/{job_id}"},
        404: {"description": "no such fit job"},
        503: {"description": "fitting is not available"},
    },
)
async def v1_cancel_job(job_id: str, ingress: Any = INGRESS):
    manager = ingress.fit_manager()
    if manager is None:
        return _fit_unavailable(ingress)
    try:
        state = await asyncio.to_thread(manager.cancel, job_id)
    except UnknownJobError as e:
        return error_response(RequestError(404, str(e), "job_id"))
    except FitUnavailableError as e:
        return _fit_unavailable(ingress, str(e))
    return JSONResponse(state, status_code=200 if state["status"] in TERMINAL else 202)


__all__ = []
