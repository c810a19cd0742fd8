"""What crosses the Ray boundary between the ingress and the generators, and how errors become answers.

The ingress turns every front end's input (/v1 JSON, KServe v2 HTTP, KServe v2 gRPC) into one
`GenerateParams`, validates it against the model's limits and resolves the user; only a valid
`ImageRequest` is sent to a generator. A generator answers each request with an `ImageResult` or a
`RequestError`, never an exception, so one request's failure is its own and no exception type has
to be unpickled across processes. `error_for` is the one mapping from the project's error types to
an HTTP status (and, through `grpc_code`, a gRPC code); every front end uses it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from premier.errors import (
    CheckpointError,
    InvalidEmbeddingError,
    InvalidRequestError,
    UnknownUserError,
)
from premier.requests import GenerationSettings, ModelProfile
from store.errors import StoreError

log = logging.getLogger("ray.serve")

# Errors a request can cause (or meet: a busy store); anything else is a server fault.
REQUEST_ERRORS = (InvalidRequestError, InvalidEmbeddingError, CheckpointError, StoreError)

_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


@dataclass(frozen=True)
class RequestError:
    """A request's failure as the client sees it: an HTTP status, a message and the field it names."""

    status: int
    message: str
    field: str | None = None
    reason: str | None = None
    """Why a request was dropped unanswered by the model ("expired", "cancelled"), for the metrics."""

    ok = False

    @property
    def retryable(self) -> bool:
        """503s carry Retry-After: the same request may succeed later."""
        return self.status == 503

    def body(self) -> dict[str, Any]:
        """The JSON body: always encodable (a message that quotes bad input may hold lone surrogates)."""
        body = {"error": safe_text(self.message)}
        if self.field is not None:
            body["field"] = safe_text(self.field)
        return body


def safe_text(text: str, limit: int = 2000) -> str:
    """`text` as valid UTF-8 (lone surrogates replaced), at most `limit` characters."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("utf-8", "replace").decode("utf-8")


def error_for(e: BaseException) -> RequestError:
    """The answer to an error a request caused; re-raises anything that is not one (a server fault)."""
    if isinstance(e, UnknownUserError):
        return RequestError(404, str(e), e.field)
    if isinstance(e, InvalidRequestError):
        return RequestError(400, str(e), e.field)
    if isinstance(e, InvalidEmbeddingError):
        return RequestError(400, str(e), "user")
    if isinstance(e, CheckpointError):
        return RequestError(409, str(e), "user")
    if isinstance(e, StoreError):  # busy or unreadable store: the request may succeed later
        log.warning("user store unavailable: %s", e)  # the detail (paths) for the server's log only
        return RequestError(503, "the user store is unavailable; retry later")
    raise e


def busy(message: str) -> RequestError:
    return RequestError(503, message)


def grpc_code(status: int) -> grpc.StatusCode:
    return _GRPC_CODES.get(status, grpc.StatusCode.INTERNAL)


@dataclass(frozen=True)
class GenerateParams:
    """One generation request as any front end reads it, before validation. None: the model's default."""

    prompt: Any
    user_id: Any = None
    seed: int | None = None
    steps: Any = None
    height: Any = None
    width: Any = None
    guidance: Any = None


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress learns from a generator (it loads no model): defaults, limits, users, tokenizer."""

    pid: int
    checkpoint_id: str | None
    profile: ModelProfile
    training_users: list[str]
    max_batch_size: int
    tokenizer: Any = field(default=None, repr=False)
    """The model's T5 tokenizer, so the ingress counts prompt tokens without loading the model."""

    def default_settings(self) -> GenerationSettings:
        p = self.profile
        return GenerationSettings(p.default_size, p.default_size, p.default_steps, p.default_guidance)

    def public(self) -> dict[str, Any]:
        """GET /v1/model."""
        p = self.profile
        limits = {
            "size_multiple": p.size_multiple,
            "min_size": p.min_size,
            "max_size": p.max_size,
            "max_steps": p.max_steps,
            "max_guidance": p.max_guidance,
            "max_sequence_length": p.max_sequence_length,
        }
        return {
            "pid": self.pid,
            "checkpoint_id": self.checkpoint_id,
            "default_settings": vars(self.default_settings()),
            "limits": limits,
            "training_users": self.training_users,
            "max_batch_size": self.max_batch_size,
        }


@dataclass(frozen=True)
class ImageRequest:
    """A valid generation request with its user resolved: what a generator receives.

    `user` is the user's embedding (N, U) from the store, a training-user id of the checkpoint, or None
    (plain FLUX); `settings` are complete and within the model's limits; the prompt's token count was
    checked by the ingress with the model's own tokenizer.
    """

    prompt: str
    seed: int
    settings: GenerationSettings
    user: torch.Tensor | str | None = None
    user_cache: str = "none"
    """How the ingress found the user: hit or miss (store embedding cache), checkpoint, none."""
    received_at: float = 0.0
    deadline: float | None = None
    """Epoch seconds after which the answer is of no use (the client's deadline or the server's timeout):
    a request still waiting then is dropped before it reaches the model."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class ImageResult:
    """One generated image with the facts of the batch it ran in."""

    image: np.ndarray
    seed: int
    settings: GenerationSettings
    batch_size: int
    batch_id: str
    batch_position: int
    timings: dict[str, float]
    user_cache: str = "none"
    step_log: tuple[tuple[int, int, int], ...] = ()
    """Step-level batching: (occupancy, joins, leaves) of each step run since the replica's previous answer, so
    the ingress's metrics count every step once."""

    ok = True


@dataclass(frozen=True)
class Progress:
    """A streamed request's progress: `step` of `steps` denoising steps done."""

    step: int
    steps: int

    def body(self) -> dict[str, int]:
        return {"step": self.step, "steps": self.steps}


Outcome = ImageResult | RequestError

__all__ = [
    "REQUEST_ERRORS",
    "RequestError",
    "error_for",
    "busy",
    "grpc_code",
    "GenerateParams",
    "ModelInfo",
    "ImageRequest",
    "ImageResult",
    "Outcome",
    "Progress",
]
