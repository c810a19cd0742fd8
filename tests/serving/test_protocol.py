"""The typed protocol between the ingress and the generators: one error mapping, picklable messages."""

from __future__ import annotations

import pickle

import grpc
import numpy as np
import pytest
import torch

from premier.errors import (
    CheckpointMismatchError,
    InvalidEmbeddingError,
    InvalidRequestError,
    UnknownUserError,
)
from premier.requests import GenerationSettings
from serving.protocol import ImageRequest, ImageResult, RequestError, error_for, grpc_code
from store.errors import StoreBusyError


@pytest.mark.parametrize(
    "error, status, field",
    [
        (UnknownUserError("ghost"), 404, "user"),
        (InvalidRequestError("steps", "0 is outside [1, 200]"), 400, "steps"),
        (InvalidEmbeddingError("has shape (2, 2)"), 400, "user"),
        (CheckpointMismatchError("bob", "a" * 64, "b" * 64), 409, "user"),
        (StoreBusyError("locked"), 503, None),
    ],
)
def test_every_request_error_has_one_status(error, status, field):
    answer = error_for(error)
    assert (answer.status, answer.field) == (status, field) and answer.ok is False
    assert answer.retryable == (status == 503)
    assert answer.body()["error"] and ("field" in answer.body()) == (field is not None)


def test_a_server_fault_is_not_turned_into_a_request_error():
    with pytest.raises(ZeroDivisionError):
        error_for(ZeroDivisionError("a bug"))


def test_grpc_codes_follow_the_http_status():
    assert grpc_code(400) == grpc.StatusCode.INVALID_ARGUMENT and grpc_code(404) == grpc.StatusCode.NOT_FOUND
    assert grpc_code(401) == grpc.StatusCode.UNAUTHENTICATED and grpc_code(503) == grpc.StatusCode.UNAVAILABLE
    assert grpc_code(429) == grpc.StatusCode.RESOURCE_EXHAUSTED and grpc_code(501) == grpc.StatusCode.UNIMPLEMENTED


def test_messages_cross_a_process_boundary_intact():
    settings = GenerationSettings(32, 32, 4, 3.5)
    request = ImageRequest("a cat", 7, settings, user=torch.arange(6.0).reshape(2, 3), user_cache="hit")
    back = pickle.loads(pickle.dumps(request))
    assert back.settings == settings and torch.equal(back.user, request.user) and back.request_id == request.request_id
    result = ImageResult(np.zeros((32, 32, 3), np.uint8), 7, settings, 2, "b-1", 1, {"pipeline_s": 0.1})
    assert pickle.loads(pickle.dumps(result)).ok is True
    assert pickle.loads(pickle.dumps(RequestError(404, "unknown user", "user"))) == RequestError(
        404, "unknown user", "user"
    )
