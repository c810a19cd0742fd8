"""What a request's failure becomes: its own 4xx, a 503 to retry, or a logged 500 with its id.

Shared by both batching modes of the generator (serving.generator, serving.step_runner).
"""

from __future__ import annotations

import logging

import torch

from serving.protocol import REQUEST_ERRORS, ImageRequest, RequestError, error_for

log = logging.getLogger("ray.serve")


def failure_of(e: BaseException, request: ImageRequest) -> RequestError:
    """The answer for a request whose preparation or forward raised `e` on its own (not in a batch).

    The project's request errors keep their status; an error that text or numbers provoke in the
    tokenizer or the model (TypeError, ValueError, UnicodeError) is the request's own input: 400;
    out of memory for this request's shape: 503 (retry, smaller); anything else is a server fault: 500,
    logged with its traceback and the request id, which the answer carries (never the traceback).
    """
    if isinstance(e, REQUEST_ERRORS):
        return error_for(e)
    if isinstance(e, torch.OutOfMemoryError):
        log.warning("request %s: out of memory at %s", request.request_id, request.settings)
        return RequestError(
            503, f"out of memory for this request's size (request {request.request_id}); retry smaller or later"
        )
    if isinstance(e, (TypeError, ValueError, UnicodeError)):
        log.info("request %s could not be processed: %r", request.request_id, e)
        return RequestError(400, f"the request could not be processed ({type(e).__name__}); check the prompt", "prompt")
    log.error("request %s failed", request.request_id, exc_info=e)
    return RequestError(500, f"internal error (request {request.request_id}); it has been logged")


def expired(request: ImageRequest) -> RequestError:
    message = f"request {request.request_id} was dropped: its deadline passed before it reached the model"
    return RequestError(503, message, reason="expired")


def release_memory(e: BaseException) -> None:
    """After an out-of-memory error, give the allocator's cache back before the retry."""
    if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["expired", "failure_of", "release_memory"]
